use super::*;
use crate::gateway::credentials::GatewayPorts;

/// Bytes 1, 2, 3, ... : every password and salt differs, and a run repeats.
struct Counter(u8);

impl Entropy for Counter {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), String> {
        for b in buf {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
        Ok(())
    }
}

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn integration(gateway: serde_json::Value) -> MailIntegration {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailintegration.dev/v1alpha1",
        "kind": "MailIntegration",
        "metadata": {"name": "inbox", "namespace": "team", "uid": "uid-1", "generation": 1},
        "spec": {
            "provider": "Google",
            "mailbox": {"address": "box@example.com"},
            "oauth": {"clientSecretRef": {"name": "client"}},
            "tokenSecret": {"name": "inbox-token"},
            "gateway": gateway,
        },
    }))
    .unwrap()
}

fn two_apps() -> MailIntegration {
    integration(serde_json::json!({
        "apps": [
            {"name": "grafana", "protocols": ["SMTP"], "sendAs": ["alerts@example.com"]},
            {"name": "helpdesk", "protocols": ["IMAP", "POP3"]},
        ],
        "rotationGracePeriod": "1h",
    }))
}

const NOW: &str = "2026-12-06T21:00:00Z";

/// One plan over `current` and `secrets`.
fn run(
    mi: &MailIntegration,
    current: Option<&GatewayConfig>,
    secrets: &BTreeMap<String, AppSecret>,
    rotation: &Rotation,
    now: Timestamp,
    rng: &mut Counter,
) -> Plan {
    plan(
        mi,
        mi.spec.gateway.as_ref().unwrap(),
        Inputs {
            current,
            app_secrets: secrets,
            rotation,
            ca_pem: None,
            now,
        },
        rng,
    )
    .unwrap()
}

/// The app Secrets after `plan` was written: each app's password (new, or as it was).
fn written(plan: &Plan, before: &BTreeMap<String, AppSecret>) -> BTreeMap<String, AppSecret> {
    let mut after = before.clone();
    for (app, p) in &plan.new_passwords {
        after.insert(app.clone(), AppSecret::Ours(Some(p.clone())));
    }
    after
}

fn password(secrets: &BTreeMap<String, AppSecret>, app: &str) -> SecretValue {
    match secrets.get(app) {
        Some(AppSecret::Ours(Some(p))) => p.clone(),
        other => panic!("{app}: {other:?}"),
    }
}

fn verify(config: &GatewayConfig, app: &str, p: &SecretValue, now: Timestamp) -> bool {
    config
        .app(&format!("team/inbox/{app}"))
        .unwrap()
        .verify(p, now)
}

#[test]
fn new_apps_get_a_43_character_password_that_only_their_verifier_matches() {
    let mi = two_apps();
    let plan = run(
        &mi,
        None,
        &BTreeMap::new(),
        &Rotation::None,
        t(NOW),
        &mut Counter(0),
    );
    assert_eq!(plan.new_passwords.len(), 2);
    let secrets = written(&plan, &BTreeMap::new());
    let (g, h) = (
        password(&secrets, "grafana"),
        password(&secrets, "helpdesk"),
    );
    for p in [&g, &h] {
        assert_eq!(p.expose().len(), 43);
        assert!(well_formed_password(p.expose()));
    }
    assert_ne!(g.expose(), h.expose());
    assert!(verify(&plan.config, "grafana", &g, t(NOW)));
    assert!(!verify(&plan.config, "grafana", &h, t(NOW)));
    assert!(verify(&plan.config, "helpdesk", &h, t(NOW)));
    let json = serde_json::to_string(&plan.config).unwrap();
    assert!(
        !json.contains(g.expose()) && !json.contains(h.expose()),
        "{json}"
    );
    assert_eq!(plan.config.apps[0].username, "team/inbox/grafana");
    assert_eq!(plan.config.apps[0].send_as, ["alerts@example.com"]);
    assert_eq!(plan.config.max_message_bytes, 26_214_400);
    assert_eq!(plan.next_retirement, None);
}

#[test]
fn a_password_is_kept_and_its_verifier_not_rewritten_on_every_reconcile() {
    let mi = two_apps();
    let mut rng = Counter(0);
    let first = run(
        &mi,
        None,
        &BTreeMap::new(),
        &Rotation::None,
        t(NOW),
        &mut rng,
    );
    let secrets = written(&first, &BTreeMap::new());
    let later = t("2026-12-07T21:00:00Z");
    let again = run(
        &mi,
        Some(&first.config),
        &secrets,
        &Rotation::None,
        later,
        &mut rng,
    );
    assert!(again.new_passwords.is_empty());
    assert_eq!(again.config, first.config, "nothing to write");
}

#[test]
fn a_lost_gateway_secret_is_rebuilt_from_the_app_secrets_passwords() {
    let mi = two_apps();
    let mut rng = Counter(0);
    let first = run(
        &mi,
        None,
        &BTreeMap::new(),
        &Rotation::None,
        t(NOW),
        &mut rng,
    );
    let secrets = written(&first, &BTreeMap::new());
    let rebuilt = run(&mi, None, &secrets, &Rotation::None, t(NOW), &mut rng);
    assert!(
        rebuilt.new_passwords.is_empty(),
        "the apps keep their passwords"
    );
    assert!(verify(
        &rebuilt.config,
        "grafana",
        &password(&secrets, "grafana"),
        t(NOW)
    ));
    assert!(verify(
        &rebuilt.config,
        "helpdesk",
        &password(&secrets, "helpdesk"),
        t(NOW)
    ));
}

#[test]
fn an_edited_or_missing_app_secret_gets_a_new_password_and_the_old_one_stops_at_once() {
    let mi = two_apps();
    let mut rng = Counter(0);
    let first = run(
        &mi,
        None,
        &BTreeMap::new(),
        &Rotation::None,
        t(NOW),
        &mut rng,
    );
    let mut secrets = written(&first, &BTreeMap::new());
    let old_g = password(&secrets, "grafana");
    let old_h = password(&secrets, "helpdesk");
    // Someone put a password of their own into grafana's Secret, and deleted helpdesk's.
    let chosen = SecretValue::new("A".repeat(43));
    secrets.insert("grafana".into(), AppSecret::Ours(Some(chosen.clone())));
    secrets.insert("helpdesk".into(), AppSecret::Missing);
    let next = run(
        &mi,
        Some(&first.config),
        &secrets,
        &Rotation::None,
        t(NOW),
        &mut rng,
    );
    assert_eq!(next.new_passwords.len(), 2);
    let after = written(&next, &secrets);
    for (app, old) in [("grafana", &old_g), ("helpdesk", &old_h)] {
        assert!(
            !verify(&next.config, app, old, t(NOW)),
            "{app}: the old password stops"
        );
        assert!(verify(&next.config, app, &password(&after, app), t(NOW)));
        assert_eq!(
            next.config
                .app(&format!("team/inbox/{app}"))
                .unwrap()
                .verifiers
                .len(),
            1
        );
    }
    assert!(
        !verify(&next.config, "grafana", &chosen, t(NOW)),
        "a chosen password is never adopted over a live verifier"
    );
    // A malformed password reads as none (see secrets::password_of): the same.
    secrets.insert("grafana".into(), AppSecret::Ours(None));
    let again = run(
        &mi,
        Some(&next.config),
        &secrets,
        &Rotation::None,
        t(NOW),
        &mut rng,
    );
    assert!(again.new_passwords.contains_key("grafana"));
}

#[test]
fn a_rotation_issues_a_new_password_and_the_old_one_works_until_the_grace_period_ends() {
    let mi = two_apps();
    let mut rng = Counter(0);
    let first = run(
        &mi,
        None,
        &BTreeMap::new(),
        &Rotation::None,
        t(NOW),
        &mut rng,
    );
    let secrets = written(&first, &BTreeMap::new());
    let old = password(&secrets, "grafana");
    let rotation = Rotation::App("2026-12-06T21:00:00Z/grafana".into(), "grafana".into());
    let rotated = run(
        &mi,
        Some(&first.config),
        &secrets,
        &rotation,
        t(NOW),
        &mut rng,
    );
    assert_eq!(
        rotated.new_passwords.keys().collect::<Vec<_>>(),
        ["grafana"],
        "only the named app"
    );
    let after = written(&rotated, &secrets);
    let new = password(&after, "grafana");
    let retires = t("2026-12-06T22:00:00Z");
    assert_eq!(rotated.next_retirement, Some(retires));
    let before_end = t("2026-12-06T21:59:59Z");
    assert!(verify(&rotated.config, "grafana", &old, before_end));
    assert!(verify(&rotated.config, "grafana", &new, before_end));
    assert!(!verify(&rotated.config, "grafana", &old, retires));
    assert!(verify(
        &rotated.config,
        "helpdesk",
        &password(&secrets, "helpdesk"),
        before_end
    ));
    // The reconcile at retiresAt drops the old verifier.
    let later = run(
        &mi,
        Some(&rotated.config),
        &after,
        &Rotation::None,
        retires,
        &mut rng,
    );
    assert!(later.new_passwords.is_empty());
    let app = later.config.app("team/inbox/grafana").unwrap();
    assert_eq!(app.verifiers.len(), 1);
    assert!(app.verify(&new, retires));
    assert_eq!(later.next_retirement, None);
}

#[test]
fn rotations_in_a_row_keep_at_most_four_old_passwords_and_a_zero_grace_keeps_none() {
    let mi = two_apps();
    let mut rng = Counter(0);
    let mut plan_ = run(
        &mi,
        None,
        &BTreeMap::new(),
        &Rotation::None,
        t(NOW),
        &mut rng,
    );
    let mut secrets = written(&plan_, &BTreeMap::new());
    for i in 0..6 {
        let rotation = Rotation::All(format!("2026-12-06T21:00:0{i}Z"));
        let now = crate::time::after(t(NOW), std::time::Duration::from_secs(i));
        plan_ = run(&mi, Some(&plan_.config), &secrets, &rotation, now, &mut rng);
        secrets = written(&plan_, &secrets);
    }
    let app = plan_.config.app("team/inbox/grafana").unwrap();
    assert_eq!(app.verifiers.len(), 1 + MAX_RETIRING);
    assert!(app.verifiers[0].retires_at.is_none());

    let zero = integration(serde_json::json!({
        "apps": [{"name": "grafana", "protocols": ["SMTP"]}], "rotationGracePeriod": "0s",
    }));
    let first = run(
        &zero,
        None,
        &BTreeMap::new(),
        &Rotation::None,
        t(NOW),
        &mut rng,
    );
    let secrets = written(&first, &BTreeMap::new());
    let rotated = run(
        &zero,
        Some(&first.config),
        &secrets,
        &Rotation::All(NOW.into()),
        t(NOW),
        &mut rng,
    );
    assert_eq!(rotated.config.apps[0].verifiers.len(), 1);
    assert!(!verify(
        &rotated.config,
        "grafana",
        &password(&secrets, "grafana"),
        t(NOW)
    ));
}

#[test]
fn removed_apps_and_apps_whose_secret_name_is_taken_have_no_verifier() {
    let mi = two_apps();
    let mut rng = Counter(0);
    let first = run(
        &mi,
        None,
        &BTreeMap::new(),
        &Rotation::None,
        t(NOW),
        &mut rng,
    );
    let mut secrets = written(&first, &BTreeMap::new());
    let one =
        integration(serde_json::json!({"apps": [{"name": "helpdesk", "protocols": ["IMAP"]}]}));
    let next = run(
        &one,
        Some(&first.config),
        &secrets,
        &Rotation::None,
        t(NOW),
        &mut rng,
    );
    assert_eq!(next.config.apps.len(), 1);
    assert!(next.config.app("team/inbox/grafana").is_none());
    assert!(next.new_passwords.is_empty());
    assert_eq!(next.config.apps[0].protocols, [GatewayProtocol::Imap]);

    secrets.insert("grafana".into(), AppSecret::Foreign);
    let taken = run(
        &mi,
        Some(&first.config),
        &secrets,
        &Rotation::None,
        t(NOW),
        &mut rng,
    );
    assert_eq!(taken.conflicts, ["grafana"]);
    assert!(taken.config.app("team/inbox/grafana").is_none());
    assert!(!taken.new_passwords.contains_key("grafana"));
}

#[test]
fn the_rotation_annotation_is_read_once_per_value_and_checked() {
    let mi = two_apps();
    let spec = mi.spec.gateway.as_ref().unwrap();
    let at = "2026-12-06T21:00:00Z";
    assert_eq!(rotation(None, None, spec), Rotation::None);
    assert_eq!(rotation(Some(at), None, spec), Rotation::All(at.into()));
    assert_eq!(rotation(Some(at), Some(at), spec), Rotation::None);
    let one = format!("{at}/grafana");
    assert_eq!(
        rotation(Some(&one), Some(at), spec),
        Rotation::App(one.clone(), "grafana".into())
    );
    for bad in [
        "yesterday",
        "2026-12-06T21:00:00Z/nobody",
        "2026-13-06T21:00:00Z",
    ] {
        assert!(
            matches!(rotation(Some(bad), None, spec), Rotation::Invalid(..)),
            "{bad}"
        );
    }
    let long = format!("{at}/{}", "x".repeat(500));
    match rotation(Some(&long), None, spec) {
        Rotation::Invalid(shown, _) => assert!(shown.len() <= 128),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_app_secret_holds_the_username_the_gateways_address_and_urls_of_its_protocols() {
    let mi = two_apps();
    let settings = GatewaySettings {
        host: "gw.ops.svc".into(),
        ports: GatewayPorts::default(),
    };
    let app = &mi.spec.gateway.as_ref().unwrap().apps[0];
    let p = SecretValue::new("abc-_XYZ0123456789abcdefghijklmnopqrstuvwxy");
    let data = app_secret_data("team", "inbox", app, &p, &settings);
    let get = |k: &str| data.get(k).map(|v| v.expose().to_owned());
    assert_eq!(get("username").as_deref(), Some("team/inbox/grafana"));
    assert_eq!(get("password").as_deref(), Some(p.expose()));
    assert_eq!(get("host").as_deref(), Some("gw.ops.svc"));
    assert_eq!(get("smtp-port").as_deref(), Some("587"));
    assert_eq!(get("smtps-port").as_deref(), Some("465"));
    assert_eq!(get("imaps-port").as_deref(), Some("993"));
    assert_eq!(get("imap-port").as_deref(), Some("143"));
    assert_eq!(get("pop3s-port").as_deref(), Some("995"));
    assert_eq!(
        get("smtp-url").as_deref(),
        Some(
            "smtp://team%2Finbox%2Fgrafana:abc%2D%5FXYZ0123456789abcdefghijklmnopqrstuvwxy@gw.ops.svc:587"
        )
    );
    assert!(
        get("smtps-url")
            .unwrap()
            .starts_with("smtps://team%2Finbox%2Fgrafana:")
    );
    assert_eq!(get("imaps-url"), None, "SMTP only");
    assert_eq!(get("pop3s-url"), None);
    let url = url::Url::parse(&get("smtp-url").unwrap()).unwrap();
    assert_eq!(url.port(), Some(587));
}

#[test]
fn upstream_servers_come_from_the_mailbox_and_the_providers_defaults() {
    let google = two_apps();
    let (imap, pop3, smtp) = upstream_servers(&google);
    assert_eq!(imap.unwrap().host, "imap.gmail.com");
    assert_eq!(pop3.unwrap().host, "pop.gmail.com");
    let smtp = smtp.unwrap();
    assert_eq!(
        (smtp.host.as_str(), smtp.port, smtp.tls),
        ("smtp.gmail.com", 465, TlsMode::Implicit)
    );
    let mut own = two_apps();
    own.spec.provider = crate::api::ProviderKind::Oidc;
    own.spec.mailbox.server = Some(crate::api::MailServer {
        host: "mail.example.com".into(),
        port: 143,
        tls: Some(TlsMode::StartTls),
    });
    let (imap, pop3, smtp) = upstream_servers(&own);
    let imap = imap.unwrap();
    assert_eq!(
        (imap.host.as_str(), imap.port, imap.tls),
        ("mail.example.com", 143, TlsMode::StartTls)
    );
    assert_eq!(pop3, None, "no POP3 server is known");
    assert_eq!(smtp, None);
    own.spec.mailbox.server.as_mut().unwrap().port = 70_000;
    assert_eq!(
        upstream_servers(&own).0,
        None,
        "a port out of range is no server"
    );
}

#[test]
fn a_port_the_gateway_does_not_serve_gets_no_key_and_no_url() {
    let mi = two_apps();
    let settings = GatewaySettings {
        host: "gw.ops.svc".into(),
        ports: GatewayPorts {
            smtps: 0,
            ..GatewayPorts::default()
        },
    };
    let app = &mi.spec.gateway.as_ref().unwrap().apps[0];
    let data = app_secret_data("team", "inbox", app, &SecretValue::new("pw"), &settings);
    assert!(!data.contains_key("smtps-port"), "{:?}", data.keys());
    assert!(!data.contains_key("smtps-url"), "{:?}", data.keys());
    assert_eq!(
        data.get("smtp-port")
            .map(|v| v.expose().to_owned())
            .as_deref(),
        Some("587")
    );
    assert!(data.contains_key("smtp-url"));
}
