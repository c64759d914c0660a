//! Headless Chromium from Debian, driven over WebDriver (chromedriver on 127.0.0.1, started under
//! [`Supervised`]) with the `fantoccini` crate. Each [`Browser`] has a fresh profile.
//!
//! Install: `apt-get install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core`

use super::process::{Supervised, reserve_port};
use fantoccini::{Client, ClientBuilder, Locator};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The Debian packages the browser tests need.
pub const APT_INSTALL: &str =
    "apt-get install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core";

fn find_binary(env: &str, candidates: &[&str]) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{} is not installed (looked for {candidates:?}; or set {env}). Install it with:\n  {APT_INSTALL}",
                candidates[0]
            )
        })
}

/// Where the tests keep screenshots (git-ignored).
pub fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts");
    std::fs::create_dir_all(&dir).expect("create tests/artifacts");
    dir
}

pub struct Browser {
    pub wd: Client,
    _driver: Supervised,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start chromedriver and a headless Chromium session with a fresh profile, sized like a phone.
    pub async fn start(log_dir: &Path) -> Browser {
        // The binary itself, not Debian's /usr/bin/chromium wrapper script.
        let chromium = find_binary(
            "MIO_CHROMIUM",
            &["/usr/lib/chromium/chromium", "/usr/bin/chromium"],
        );
        let chromedriver = find_binary(
            "MIO_CHROMEDRIVER",
            &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
        );
        let port = reserve_port();
        let driver = Supervised::spawn(
            "chromedriver",
            &chromedriver,
            &[format!("--port={port}"), "--allowed-ips=127.0.0.1".into()],
            &[],
            log_dir.join(format!("chromedriver-{port}.log")),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen within 30 s:\n{}",
                driver.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::Builder::new()
            .prefix("mio-chromium-")
            .tempdir()
            .unwrap();
        let caps = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    "--window-size=412,915",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let caps = match caps {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let wd = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "could not start a Chromium session ({e}).\n--- chromedriver log ---\n{}\nIf Chromium is missing: {APT_INSTALL}",
                    driver.log_tail(30)
                )
            });
        Browser {
            wd,
            _driver: driver,
            _profile: profile,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.wd
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    pub async fn url(&self) -> url::Url {
        self.wd.current_url().await.unwrap()
    }

    /// The page's visible text.
    pub async fn text(&self) -> String {
        match self.wd.find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Wait until the page's text contains `needle`; returns the text.
    pub async fn wait_text(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text().await;
            if text.contains(needle) {
                return text;
            }
            if Instant::now() > deadline {
                panic!(
                    "the page at {} did not show {needle:?} within {timeout:?}; it shows:\n{text}",
                    self.url().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, css: &str) {
        let url = self.url().await;
        self.wd
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css} on {url}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Whether the element matching `css` is selected (a checked radio button).
    pub async fn is_selected(&self, css: &str) -> bool {
        self.wd
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
            .is_selected()
            .await
            .unwrap()
    }

    /// Replace the value of an input.
    pub async fn fill(&self, css: &str, value: &str) {
        let url = self.url().await;
        let e = self
            .wd
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css} on {url}: {e}"));
        e.clear().await.unwrap();
        e.send_keys(value).await.unwrap();
    }

    pub async fn value(&self, css: &str) -> Option<String> {
        let e = self.wd.find(Locator::Css(css)).await.ok()?;
        e.prop("value").await.ok().flatten()
    }

    pub async fn exists(&self, css: &str) -> bool {
        self.wd.find(Locator::Css(css)).await.is_ok()
    }

    /// A cookie's value (HttpOnly ones too: WebDriver sees them).
    pub async fn cookie(&self, name: &str) -> Option<String> {
        self.wd
            .get_named_cookie(name)
            .await
            .ok()
            .map(|c| c.value().to_owned())
    }

    /// Save a PNG screenshot under tests/artifacts/.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.wd.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
        let path = artifacts_dir().join(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    pub async fn close(self) {
        let _ = self.wd.close().await;
    }
}
