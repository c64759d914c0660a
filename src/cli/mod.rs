//! `kubectl mailint`: the kubectl plugin (binary `kubectl-mailint`) for operating MailIntegrations,
//! as `cmctl` is for cert-manager. It talks to the API server only, with the user's kubeconfig and
//! the user's permissions; it reads the metadata of Secrets, never their data.

pub mod gateway;
pub mod report;

use crate::api::{MailIntegration, REFRESH_REQUESTED_ANNOTATION};
use crate::reason::Reason;
use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use report::{EventReport, SecretMeta, StatusReport, Style};
use std::io::IsTerminal as _;
use std::path::PathBuf;

/// Field manager of the CLI's writes (annotations, spec.suspend).
pub const FIELD_MANAGER: &str = "kubectl-mailint";

/// Operate MailIntegrations: status, refresh, sign-in links, suspend and resume, reason docs.
#[derive(Debug, Parser)]
#[command(name = "kubectl-mailint", bin_name = "kubectl mailint", version, about)]
pub struct Cli {
    /// Namespace of the MailIntegration (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,
    /// Every namespace (status without NAME, refresh --all or -l).
    #[arg(short = 'A', long, global = true)]
    pub all_namespaces: bool,
    /// Path of the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One screen on a MailIntegration: conditions and what to do, token, mailbox, Secrets, sign-in
    /// link, events. Without NAME: one line per MailIntegration.
    Status {
        name: Option<String>,
        /// Print the report as JSON or YAML instead of text.
        #[arg(short, long)]
        output: Option<Output>,
    },
    /// Ask the operator to refresh the access token now (sets the refresh-requested-at annotation).
    Refresh {
        names: Vec<String>,
        /// Every MailIntegration of the namespace (with -A: of every namespace).
        #[arg(long, conflicts_with = "selector")]
        all: bool,
        /// The MailIntegrations matching this label selector.
        #[arg(short = 'l', long)]
        selector: Option<String>,
    },
    /// Print the sign-in link of a MailIntegration (status.signIn.url), or say why there is none.
    SignIn { name: String },
    /// Stop refreshing and checking (spec.suspend: true).
    Suspend { names: Vec<String> },
    /// Refresh and check again (spec.suspend: false).
    Resume { names: Vec<String> },
    /// What a reason means and what to do about it. Without REASON: every reason.
    Explain { reason: Option<String> },
    /// Issue new gateway passwords (sets the rotate-gateway-credentials annotation): the apps'
    /// Secrets get new passwords, the old ones work for spec.gateway.rotationGracePeriod more.
    RotateGateway {
        name: String,
        /// Only this app of spec.gateway.apps (default: every app).
        #[arg(long)]
        app: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Json,
    Yaml,
}

/// Colour only on a terminal, and never with NO_COLOR set.
pub fn style_for_stdout() -> Style {
    Style {
        colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    }
}

/// Run the command; what it prints goes to stdout, and an error ends it with a non-zero exit.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let style = style_for_stdout();
    if let Command::Explain { reason } = &cli.command {
        print!("{}", explain_text(reason.as_deref(), style)?);
        return Ok(());
    }
    let (client, default_ns) = client(&cli).await?;
    let ns = cli.namespace.clone().unwrap_or(default_ns);
    let api: Api<MailIntegration> = Api::namespaced(client.clone(), &ns);
    match cli.command {
        Command::Status {
            name: Some(name),
            output,
        } => {
            let mi = get(&api, &ns, &name).await?;
            let report = status_report(&client, &mi).await?;
            match output {
                Some(Output::Json) => println!("{}", serde_json::to_string_pretty(&report)?),
                Some(Output::Yaml) => print!("{}", serde_saphyr::to_string(&report)?),
                None => print!("{}", report::render(&report, Timestamp::now(), style)),
            }
        }
        Command::Status { name: None, output } => {
            let list = if cli.all_namespaces {
                Api::<MailIntegration>::all(client.clone())
            } else {
                api.clone()
            };
            let mut reports = Vec::new();
            for mi in list.list(&ListParams::default()).await?.items {
                // The table needs no Secrets or events: one list call.
                reports.push(StatusReport::build(&mi, &[], vec![]));
            }
            match output {
                Some(Output::Json) => println!("{}", serde_json::to_string_pretty(&reports)?),
                Some(Output::Yaml) => print!("{}", serde_saphyr::to_string(&reports)?),
                None if reports.is_empty() => eprintln!(
                    "No MailIntegrations found{}.",
                    if cli.all_namespaces {
                        String::new()
                    } else {
                        format!(" in namespace {ns}")
                    }
                ),
                None => print!(
                    "{}",
                    report::render_table(&reports, Timestamp::now(), style, cli.all_namespaces)
                ),
            }
        }
        Command::Refresh {
            names,
            all,
            selector,
        } => {
            let targets =
                targets(&client, &api, &ns, names, all, selector, cli.all_namespaces).await?;
            let value = Timestamp::now().to_string();
            for mi in targets {
                let ns = mi.namespace().unwrap_or_default();
                let patch = serde_json::json!({
                    "metadata": {"annotations": {REFRESH_REQUESTED_ANNOTATION: value}}
                });
                Api::<MailIntegration>::namespaced(client.clone(), &ns)
                    .patch(&mi.name_any(), &patch_params(), &Patch::Merge(&patch))
                    .await
                    .with_context(|| format!("annotating {ns}/{}", mi.name_any()))?;
                println!("Refresh requested for {ns}/{}", mi.name_any());
            }
        }
        Command::SignIn { name } => {
            let mi = get(&api, &ns, &name).await?;
            match mi.status.as_ref().and_then(|s| s.sign_in.as_ref()) {
                Some(s) => {
                    eprintln!(
                        "Sign in as {} before {} (open the link in a browser):",
                        mi.spec.mailbox.address, s.expires_at.0
                    );
                    println!("{}", s.url);
                }
                None => bail!("{}", no_sign_in_reason(&mi)),
            }
        }
        Command::Suspend { names } => set_suspend(&api, &ns, names, true).await?,
        Command::Resume { names } => set_suspend(&api, &ns, names, false).await?,
        Command::RotateGateway { name, app } => {
            let mi = get(&api, &ns, &name).await?;
            let value = gateway::rotation_value(&mi, app.as_deref(), Timestamp::now())?;
            api.patch(
                &name,
                &patch_params(),
                &Patch::Merge(&gateway::rotation_patch(&value)),
            )
            .await
            .with_context(|| format!("annotating {ns}/{name}"))?;
            let grace = mi
                .spec
                .gateway
                .as_ref()
                .map(|g| g.rotation_grace_period())
                .unwrap_or_default();
            println!(
                "Gateway credentials of {ns}/{name} rotated ({}): new passwords in {}; the old ones work for {} more",
                app.as_deref().unwrap_or("every app"),
                gateway::credentials(&mi)
                    .iter()
                    .filter(|c| app.as_deref().is_none_or(|a| a == c.app))
                    .map(|c| format!("Secret {}", c.secret))
                    .collect::<Vec<_>>()
                    .join(", "),
                jiff::SignedDuration::try_from(grace)
                    .map(|d| format!("{d:#}"))
                    .unwrap_or_default()
            );
        }
        Command::Explain { .. } => {}
    }
    Ok(())
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// The text of `explain [REASON]`.
pub fn explain_text(reason: Option<&str>, style: Style) -> anyhow::Result<String> {
    match reason {
        Some(r) => match Reason::parse(r) {
            Some(r) => Ok(report::explain(r, style)),
            None => bail!(
                "{r:?} is not a reason of mail-integration-operator; `kubectl mailint explain` lists them"
            ),
        },
        None => {
            let mut out = String::new();
            for c in crate::reason::Category::ALL {
                out.push_str(&style.bold(c.title()));
                out.push('\n');
                for r in Reason::ALL.iter().filter(|r| r.category() == *c) {
                    out.push_str(&format!("  {:<27} {}\n", r.as_str(), r.what_happened()));
                }
                out.push('\n');
            }
            Ok(out)
        }
    }
}

/// Why `sign-in` has no link to print.
pub fn no_sign_in_reason(mi: &MailIntegration) -> String {
    let id = format!("{}/{}", mi.namespace().unwrap_or_default(), mi.name_any());
    let Some(status) = &mi.status else {
        return format!(
            "{id} has no status yet: the operator has not reconciled it (is it running, and watching this namespace?)"
        );
    };
    let authorized = status
        .conditions
        .iter()
        .find(|c| c.type_ == crate::api::condition::AUTHORIZED);
    match authorized {
        Some(c) if c.status == "True" => format!(
            "{id} needs no sign-in: it is authorized as {} (Authorized=True). To sign in again anyway, delete its grant Secret {}",
            status.account.as_deref().unwrap_or("the mailbox account"),
            mi.grant_secret_name()
        ),
        Some(c) => format!(
            "{id} has no sign-in link: Authorized=False, reason {}: {}{}",
            c.reason,
            c.message,
            Reason::parse(&c.reason)
                .map(|r| format!("\nWhat to do: {}", r.hint()))
                .unwrap_or_default()
        ),
        None => format!(
            "{id} has no sign-in link yet: the operator runs without its sign-in server, or has not written the link"
        ),
    }
}

async fn client(cli: &Cli) -> anyhow::Result<(Client, String)> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        None if cli.context.is_some() => Config::from_kubeconfig(&options).await?,
        None => Config::infer()
            .await
            .context("no kubeconfig found: set KUBECONFIG or pass --kubeconfig")?,
    };
    let ns = config.default_namespace.clone();
    Ok((Client::try_from(config)?, ns))
}

async fn get(api: &Api<MailIntegration>, ns: &str, name: &str) -> anyhow::Result<MailIntegration> {
    api.get_opt(name)
        .await
        .with_context(|| format!("reading MailIntegration {ns}/{name}"))?
        .with_context(|| format!("MailIntegration {ns}/{name} not found"))
}

/// The integrations a command acts on: the named ones, or every one (of the namespace, or of all
/// with -A) matching the selector.
async fn targets(
    client: &Client,
    api: &Api<MailIntegration>,
    ns: &str,
    names: Vec<String>,
    all: bool,
    selector: Option<String>,
    all_namespaces: bool,
) -> anyhow::Result<Vec<MailIntegration>> {
    if !names.is_empty() {
        if all || selector.is_some() {
            bail!("name MailIntegrations, or use --all or -l, not both");
        }
        let mut out = Vec::new();
        for n in names {
            out.push(get(api, ns, &n).await?);
        }
        return Ok(out);
    }
    if !all && selector.is_none() {
        bail!("name a MailIntegration, or use --all or -l SELECTOR");
    }
    let list_api = if all_namespaces {
        Api::<MailIntegration>::all(client.clone())
    } else {
        api.clone()
    };
    let mut lp = ListParams::default();
    if let Some(s) = selector {
        lp = lp.labels(&s);
    }
    let items = list_api.list(&lp).await?.items;
    if items.is_empty() {
        bail!("no MailIntegration matches");
    }
    Ok(items)
}

async fn set_suspend(
    api: &Api<MailIntegration>,
    ns: &str,
    names: Vec<String>,
    suspend: bool,
) -> anyhow::Result<()> {
    if names.is_empty() {
        bail!(
            "name the MailIntegrations to {}",
            if suspend { "suspend" } else { "resume" }
        );
    }
    for name in names {
        get(api, ns, &name).await?;
        let patch = serde_json::json!({"spec": {"suspend": suspend}});
        api.patch(&name, &patch_params(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("patching {ns}/{name}"))?;
        println!(
            "MailIntegration {ns}/{name} {}",
            if suspend { "suspended" } else { "resumed" }
        );
    }
    Ok(())
}

/// Everything `status NAME` shows: the resource, the metadata of its Secrets, its events.
async fn status_report(client: &Client, mi: &MailIntegration) -> anyhow::Result<StatusReport> {
    let ns = mi.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut metas = Vec::new();
    for (_, name) in report::involved_secrets(mi) {
        // Metadata only: the data of a Secret never reaches this process.
        let meta = match secrets.get_metadata_opt(&name).await {
            Ok(m) => m.map(|m| SecretMeta {
                labels: m.metadata.labels.clone().unwrap_or_default(),
                created: m.metadata.creation_timestamp.as_ref().map(|t| t.0),
                owners: m
                    .metadata
                    .owner_references
                    .unwrap_or_default()
                    .into_iter()
                    .map(|o| o.uid)
                    .collect(),
            }),
            // No right to read Secrets' metadata: report it as unknown rather than fail.
            Err(kube::Error::Api(e)) if e.code == 403 => None,
            Err(e) => return Err(e.into()),
        };
        metas.push(meta);
    }
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let uid = mi.uid().unwrap_or_default();
    let lp = ListParams::default().fields(&format!("involvedObject.uid={uid}"));
    let events = match events.list(&lp).await {
        Ok(list) => list.items.into_iter().map(event_report).collect(),
        Err(kube::Error::Api(e)) if e.code == 403 => vec![],
        Err(e) => return Err(e.into()),
    };
    Ok(StatusReport::build(mi, &metas, events))
}

fn event_report(e: Event) -> EventReport {
    let last_seen = e
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or(e.last_timestamp.as_ref().map(|t| t.0))
        .or(e.event_time.as_ref().map(|t| t.0))
        .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0));
    let count = e
        .series
        .as_ref()
        .and_then(|s| s.count)
        .or(e.count)
        .unwrap_or(1);
    EventReport {
        type_: e.type_.unwrap_or_default(),
        reason: e.reason.unwrap_or_default(),
        message: e.message.unwrap_or_default(),
        count,
        last_seen,
    }
}
