use std::path::Path;

use claw_proto::v1::{Agent, Api, Backend, ClientKey, ClusterConfig, ModelMapping};

use super::*;
use crate::api_key::KeySource;

/// A configuration as the server exports it: normalized, with ids, status
/// and timestamps (which the document does not carry).
fn exported_config() -> ClusterConfig {
    let ts = Some(prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 0,
    });
    ClusterConfig {
        backends: vec![
            Backend {
                id: "be_01".into(),
                name: "openai-1".into(),
                label: "main account".into(),
                base_url: "https://api.example.com/v1".into(),
                api_key_ref: "env:OPENAI_API_KEY".into(),
                api: Api::Anthropic as i32,
                pool: Pool::Primary as i32,
                rpm: 600,
                tpm: Some(100_000),
                timeout_ms: 120_000,
                weight: 1,
                enabled: true,
                native_only: true,
                status: "enabled".into(),
                models: vec![ModelMapping {
                    canonical: "gpt-4o".into(),
                    native: "gpt-4o-2024-08-06".into(),
                    input_cost_per_token: 0.0000025,
                    output_cost_per_token: 0.00001,
                    cache_read_cost_per_token: 0.00000125,
                    cache_write_cost_per_token: 0.0,
                    context_window: 128_000,
                    max_tokens: 16_384,
                    cache_write_1h_cost_per_token: 0.000006,
                }],
                created_at: ts,
                updated_at: ts,
                ..Default::default()
            },
            Backend {
                id: "be_02".into(),
                name: "local.llama".into(),
                base_url: "http://10.0.0.5:8000/v1".into(),
                api_key_ref: "file:/etc/claw/local.key".into(),
                api: Api::Openai as i32,
                pool: Pool::Fallback as i32,
                rpm: 30,
                tpm: None,
                timeout_ms: 1_500,
                weight: 7,
                enabled: false,
                status: "disabled".into(),
                models: vec![ModelMapping {
                    canonical: "llama3".into(),
                    native: "llama3".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ],
        pools: vec![
            validate::default_pool_settings(Pool::Primary),
            PoolSettings {
                cooldown_base_ms: 1_000,
                cooldown_max_ms: 90_000,
                exponential: false,
                emergency_fraction: 0.1,
                max_retries: 0,
                queue_depth: 10,
                queue_timeout_ms: 2_500,
                request_timeout_ms: 60_000,
                ..validate::default_pool_settings(Pool::Fallback)
            },
        ],
        client_keys: vec![
            ClientKey {
                id: "ck_01".into(),
                name: "app".into(),
                models: vec!["gpt-4o".into()],
                rpm: 120,
                prefix: "ck-abc".into(),
                created_at: ts,
                internal: false,
                ..Default::default()
            },
            ClientKey {
                id: "ck_02".into(),
                name: "all".into(),
                ..Default::default()
            },
        ],
        agents: vec![Agent {
            id: "a1".into(),
            name: "Agent One".into(),
            model: "gpt-4o".into(),
            interval_seconds: 5_400,
            active_hours: "22:00-06:00".into(),
            timezone: "Asia/Shanghai".into(),
            checklist: "# HEARTBEAT\n- check inbox: \"urgent\"\n- reply HEARTBEAT_OK\n".into(),
            webhook_url: "https://hooks.example/a1".into(),
            enabled: false,
            pause_note: "on leave".into(),
            prompt: String::new(),
            run_timeout_seconds: 90,
            catch_up_seconds: 0,
            created_at: ts,
            updated_at: ts,
            stagger: Some(true),
            isolated_session: true,
            busy_window_seconds: 300,
            busy_defer_max_seconds: 0,
            webhook_secret: String::new(),
            webhook_secret_ref: String::new(),
            ..Default::default()
        }],
    }
}

/// What `to_config` should produce for `exported_config()`: the same minus
/// output-only fields.
fn without_output_fields(mut cfg: ClusterConfig) -> ClusterConfig {
    for b in &mut cfg.backends {
        b.id.clear();
        b.status.clear();
        b.created_at = None;
        b.updated_at = None;
    }
    for k in &mut cfg.client_keys {
        k.id.clear();
        k.prefix.clear();
        k.created_at = None;
    }
    for a in &mut cfg.agents {
        a.created_at = None;
        a.updated_at = None;
    }
    cfg
}

#[test]
fn export_then_apply_round_trips_through_yaml() {
    let exported = from_config(&exported_config());
    assert!(exported.unreferenced.is_empty());
    let yaml = to_yaml(&exported.document).expect("serializable");
    let parsed = parse(&yaml).expect("own output parses");
    assert_eq!(parsed, exported.document);
    // Serializing again gives byte-identical text: export is stable.
    assert_eq!(to_yaml(&parsed).expect("serializable"), yaml);
    let desired = to_config(&parsed, Path::new("/work")).expect("valid");
    assert_eq!(desired.config, without_output_fields(exported_config()));
    assert_eq!(
        desired.keys,
        vec![
            Some(KeySource::Env("OPENAI_API_KEY".into())),
            Some(KeySource::File("/etc/claw/local.key".into())),
        ]
    );
    assert!(desired.config.backends.iter().all(|b| b.api_key.is_empty()));
}

#[test]
fn export_writes_the_documented_shape() {
    let yaml = to_yaml(&from_config(&exported_config()).document).expect("serializable");
    for expected in [
        "backends:\n  - name: openai-1\n    label: main account\n",
        "    api_key_env: OPENAI_API_KEY\n",
        "    api_key_file: /etc/claw/local.key\n",
        "    pool: fallback\n",
        "    timeout: 2m\n",
        "    timeout: 1s500ms\n",
        "    tpm: 100000\n",
        "    models:\n      - canonical: gpt-4o\n        native: gpt-4o-2024-08-06\n        input_cost_per_token: 0.0000025\n",
        "        cache_write_cost_per_token: 0\n        cache_write_1h_cost_per_token: 0.000006\n",
        "    api_key_env: OPENAI_API_KEY\n    api: anthropic\n",
        "    api_key_file: /etc/claw/local.key\n    api: openai\n",
        "    enabled: true\n    native_only: true\n",
        "    enabled: false\n    native_only: false\n",
        "pools:\n  primary:\n    cooldown_base: 5s\n    cooldown_max: 5m\n",
        "    request_timeout: 10m\n",
        "client_keys:\n  - name: app\n    models:\n      - gpt-4o\n    rpm: 120\n",
        "  - name: all\n    models: []\n    rpm: 0\n",
        "agents:\n  - id: a1\n",
        "    interval: 1h30m\n",
        "    checklist: |\n      # HEARTBEAT\n",
        "    run_timeout: 1m30s\n",
        "    catch_up: 0s\n",
    ] {
        assert!(yaml.contains(expected), "missing {expected:?} in\n{yaml}");
    }
    assert!(!yaml.contains("be_01"), "ids are not configuration");
    assert!(!yaml.contains("status"));
}

#[test]
fn unreferenced_keys_get_a_placeholder_variable_and_internal_keys_stay_out() {
    let mut cfg = exported_config();
    cfg.backends[0].api_key_ref.clear();
    cfg.client_keys.push(ClientKey {
        name: "claw-heartbeat".into(),
        internal: true,
        ..Default::default()
    });
    let exported = from_config(&cfg);
    assert_eq!(exported.unreferenced, vec!["openai-1".to_string()]);
    assert_eq!(
        exported.document.backends[0].api_key_env.as_deref(),
        Some("CLAW_API_KEY_OPENAI_1")
    );
    assert_eq!(exported.document.client_keys.len(), 2);
    assert_eq!(placeholder_env("local.llama"), "CLAW_API_KEY_LOCAL_LLAMA");
}

#[test]
fn the_contract_example_parses_with_defaults() {
    let doc = parse(
        r#"
backends:
  - name: openai-1
    base_url: https://api.example.com/v1
    api_key_env: OPENAI_API_KEY
    models:
      - {canonical: gpt-4o, native: gpt-4o-2024-08-06, input_cost_per_token: 0.0000025, output_cost_per_token: 0.00001}
      - {canonical: gpt-4o-mini}
pools:
  fallback: {cooldown_base: 10s, max_retries: 1}
client_keys:
  - {name: app, models: [gpt-4o]}
agents:
  - {id: a1, model: gpt-4o, active_hours: "09:00-18:00", timezone: Asia/Shanghai, checklist: "..."}
"#,
    )
    .expect("valid");
    let desired = to_config(&doc, Path::new("/")).expect("valid");
    let b = &desired.config.backends[0];
    assert_eq!(
        (b.rpm, b.weight, b.timeout_ms, b.enabled),
        (60, 1, 120_000, true)
    );
    assert_eq!(b.pool, Pool::Primary as i32);
    assert_eq!(b.api, Api::Openai as i32, "api defaults to openai");
    assert!(!b.native_only, "native_only defaults to false");
    assert_eq!(b.models[1].native, "gpt-4o-mini");
    assert_eq!(b.api_key_ref, "env:OPENAI_API_KEY");
    assert_eq!(desired.config.pools.len(), 1, "primary is left unchanged");
    let p = &desired.config.pools[0];
    assert_eq!(p.pool, Pool::Fallback as i32);
    assert_eq!(
        (p.cooldown_base_ms, p.max_retries, p.cooldown_max_ms),
        (10_000, 1, 300_000)
    );
    let a = &desired.config.agents[0];
    assert_eq!(
        (a.name.as_str(), a.interval_seconds, a.enabled),
        ("a1", 1800, true)
    );
}

#[test]
fn malformed_yaml_reports_file_line_and_column() {
    let err = parse("backends:\n  - name: b1\n    rpm: [1\n").expect_err("malformed");
    assert!(err.line.is_some() && err.column.is_some(), "{err:?}");
    let rendered = err.in_file("claw.yaml");
    assert!(rendered.starts_with("claw.yaml:"), "{rendered}");
    assert!(!rendered.contains('\n'));
    assert!(!rendered.contains(" at line "), "{rendered}");

    let err = parse("backends:\n  - name: b1\n    base_url: http://x\n    rpm: lots\n")
        .expect_err("rpm is a number");
    assert_eq!((err.line, err.column), (Some(4), Some(10)));
    assert!(err.message.contains("rpm"), "{}", err.message);
}

#[test]
fn unknown_fields_are_rejected_where_they_are() {
    let err =
        parse("backends:\n  - name: b1\n    base_url: http://x\n    rmp: 5\n").expect_err("typo");
    assert_eq!(err.line, Some(4));
    assert!(
        err.message.contains("unknown field `rmp`"),
        "{}",
        err.message
    );
    assert_eq!(
        err.in_file("c.yaml"),
        format!("c.yaml:4:5: {}", err.message)
    );
    let err = parse("backend: []\n").expect_err("typo at top level");
    assert!(
        err.message.contains("unknown field `backend`"),
        "{}",
        err.message
    );
    let err = parse("pools:\n  primary:\n    cooldown: 5s\n").expect_err("typo in pool");
    assert!(
        err.message.contains("unknown field `cooldown`"),
        "{}",
        err.message
    );
    let err = parse("pools:\n  tertiary: {}\n").expect_err("no such pool");
    assert!(err.message.contains("tertiary"), "{}", err.message);
}

#[test]
fn empty_and_badly_typed_documents_are_errors() {
    assert_eq!(
        parse("# nothing\n").expect_err("empty").in_file("x.yaml"),
        "x.yaml: the document is empty"
    );
    assert!(parse("- a\n- b\n").is_err());
    let err = parse("agents:\n  - {id: a1, model: m, interval: soon}\n").expect_err("duration");
    assert!(err.message.contains("invalid duration"), "{}", err.message);
    let err =
        parse("backends:\n  - {name: b, base_url: http://x, pool: tertiary}\n").expect_err("pool");
    assert!(err.message.contains("primary"), "{}", err.message);
}

#[test]
fn validation_errors_carry_the_field_path() {
    let mut doc = from_config(&exported_config()).document;
    doc.backends[1].rpm = 0;
    let err = to_config(&doc, Path::new("/")).expect_err("rpm 0");
    assert_eq!(err.to_string(), "backends[1].rpm: must be > 0");

    let mut doc = from_config(&exported_config()).document;
    doc.backends[0].models[0].input_cost_per_token = -1.0;
    assert_eq!(
        to_config(&doc, Path::new("/")).expect_err("negative").field,
        "backends[0].models[0].input_cost_per_token"
    );

    let mut doc = from_config(&exported_config()).document;
    doc.backends[1].name = "openai-1".into();
    assert_eq!(
        to_config(&doc, Path::new("/")).expect_err("dup").field,
        "backends[1].name"
    );

    let mut doc = from_config(&exported_config()).document;
    doc.backends[0].api_key_file = Some("k".into());
    assert_eq!(
        to_config(&doc, Path::new("/")).expect_err("both").field,
        "backends[0].api_key_file"
    );

    let mut doc = from_config(&exported_config()).document;
    doc.agents[0].timezone = "Mars/Olympus".into();
    assert_eq!(
        to_config(&doc, Path::new("/")).expect_err("tz").field,
        "agents[0].timezone"
    );

    let mut doc = from_config(&exported_config()).document;
    doc.agents[0].interval = Dur(Duration::from_millis(1500));
    assert_eq!(
        to_config(&doc, Path::new("/"))
            .expect_err("sub-second")
            .field,
        "agents[0].interval"
    );

    let mut doc = from_config(&exported_config()).document;
    if let Some(p) = doc.pools.fallback.as_mut() {
        p.emergency_fraction = 2.0;
    }
    assert_eq!(
        to_config(&doc, Path::new("/")).expect_err("fraction").field,
        "pools.fallback.emergency_fraction"
    );
}

#[test]
fn relative_key_files_resolve_against_the_document_directory() {
    let doc = parse("backends:\n  - {name: b, base_url: http://x, api_key_file: keys/b.key}\n")
        .expect("valid");
    let desired = to_config(&doc, Path::new("/etc/claw")).expect("valid");
    assert_eq!(
        desired.config.backends[0].api_key_ref,
        "file:/etc/claw/keys/b.key"
    );
    assert_eq!(
        desired.keys[0],
        Some(KeySource::File("/etc/claw/keys/b.key".into()))
    );
}

#[test]
fn an_unknown_api_is_rejected_naming_the_choices() {
    let err = parse("backends:\n  - {name: b1, base_url: https://x.example/v1, api: claude}\n")
        .expect_err("claude is not a protocol");
    let message = err.in_file("claw.yaml");
    assert!(
        message.contains("claude") && message.contains("openai") && message.contains("anthropic"),
        "{message}"
    );
}

#[test]
fn wake_targets_and_fallback_models_round_trip_and_defaults_stay_out() {
    let mut cfg = exported_config();
    let yaml = to_yaml(&from_config(&cfg).document).expect("serializable");
    for absent in ["target:", "wake_url:", "fallback_model:"] {
        assert!(
            !yaml.contains(absent),
            "{absent} is omitted by default:\n{yaml}"
        );
    }
    let a = &mut cfg.agents[0];
    a.target = claw_proto::v1::HeartbeatTarget::Wake as i32;
    a.wake_url = "https://openclaw.example/hooks/wake".into();
    a.fallback_model = "llama3".into();
    let exported = from_config(&cfg);
    let yaml = to_yaml(&exported.document).expect("serializable");
    for expected in [
        "    target: wake\n",
        "    wake_url: https://openclaw.example/hooks/wake\n",
        "    fallback_model: llama3\n",
    ] {
        assert!(yaml.contains(expected), "{expected:?} in:\n{yaml}");
    }
    let parsed = parse(&yaml).expect("own output parses");
    let desired = to_config(&parsed, Path::new("/work")).expect("valid");
    assert_eq!(desired.config, without_output_fields(cfg));
    let bad = yaml.replace("target: wake", "target: cron");
    let err = to_config(&parse(&bad).expect("parses"), Path::new("/work")).expect_err("bad target");
    assert!(err.to_string().contains("target"), "{err}");
}

#[test]
fn a_keys_agents_and_max_parallel_round_trip_and_bad_agent_ids_are_refused() {
    let mut cfg = exported_config();
    cfg.client_keys[0].max_parallel = 4;
    cfg.client_keys[0].agents = vec!["a1".into(), "b2".into()];
    let yaml = to_yaml(&from_config(&cfg).document).expect("yaml");
    assert!(
        yaml.contains("    max_parallel: 4\n    agents:\n      - a1\n      - b2\n"),
        "{yaml}"
    );
    let doc = parse(&yaml).expect("valid");
    let desired = to_config(&doc, Path::new("/")).expect("valid");
    let k = &desired.config.client_keys[0];
    assert_eq!(
        (k.max_parallel, k.agents.clone()),
        (4, vec!["a1".to_string(), "b2".to_string()])
    );
    let bad = parse("client_keys:\n  - {name: app, agents: [Bad_Id]}\n").expect("parses");
    let err = to_config(&bad, Path::new("/")).expect_err("refused");
    assert_eq!(err.field, "client_keys[0].agents[0]", "{err}");
}
