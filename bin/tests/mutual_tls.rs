//! The real binaries with mutual TLS on loopback: `server --client-ca`,
//! clients with the development client certificates (`certs/clients/`),
//! each record under its identity, a read side only for those allowed,
//! and anonymous mode kept to loopback unless said otherwise.

mod common;

use std::time::Duration;

use common::{EXE, free_tcp_port, free_udp_port, http_get, lines_of, records, spawn, wait};
use serde_json::Value;

/// A file of the repository's `certs/`.
fn certs(path: &str) -> String {
    format!("{}/../certs/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn cert(name: &str) -> [String; 4] {
    [
        "--cert".into(),
        certs(&format!("clients/{name}.pem")),
        "--key".into(),
        certs(&format!("clients/{name}.key")),
    ]
}

/// `quic-report get URL` with `extra` flags: exit status, stdout, stderr.
fn get(url: &str, extra: &[String]) -> (bool, String, String) {
    let out = std::process::Command::new(EXE)
        .arg("get")
        .arg(url)
        .args(extra)
        .output()
        .expect("get runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn records_carry_identities_a_reader_reads_all_another_identity_only_its_own() {
    let (sp, qp, mp) = (free_tcp_port(), free_udp_port(), free_tcp_port());
    let (source, server, metrics) = (
        format!("127.0.0.1:{sp}"),
        format!("127.0.0.1:{qp}"),
        format!("127.0.0.1:{mp}"),
    );
    let _source = spawn("source", &["source", "--listen", &source]);
    let ca = certs("ca.pem");
    let mut srv = spawn(
        "server",
        &[
            "server",
            "--listen",
            &server,
            "--metrics",
            &metrics,
            "--client-ca",
            &ca,
            "--reader",
            "ops-reader",
        ],
    );
    let rx = lines_of(&mut srv);
    let url = format!("http://{source}/");
    for name in ["device-1", "device-2"] {
        let mut args: Vec<String> = [
            "client",
            "--server",
            &server,
            "--source",
            &url,
            "--interval",
            "100ms",
            "--count",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(cert(name));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = spawn("client", &args);
        let status = wait(&mut c, Duration::from_secs(60));
        assert!(status.is_some_and(|s| s.success()), "{name}: {status:?}");
    }
    let mut got = Vec::new();
    records(&rx, &mut got, 6, Duration::from_secs(5));
    let of = |who: &str| got.iter().filter(|r| r["identity"] == who).count();
    assert_eq!((of("device-1"), of("device-2")), (3, 3), "{got:?}");

    // A client without a certificate is refused, says why, exits non-zero.
    let mut anon = spawn(
        "client",
        &[
            "client", "--server", &server, "--source", &url, "--count", "1",
        ],
    );
    let status = wait(&mut anon, Duration::from_secs(30));
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    let err = common::stderr_of(&mut anon);
    assert!(err.contains("requires a client certificate"), "{err}");

    let latest = format!("https://{server}/latest");
    let (ok, body, err) = get(&latest, &cert("ops-reader"));
    assert!(ok, "{err}");
    let all: Value = serde_json::from_str(&body).expect("JSON");
    assert!(
        all["device-1"].is_object() && all["device-2"].is_object(),
        "a reader reads everyone's: {all}"
    );
    let (ok, body, err) = get(&latest, &cert("device-1"));
    assert!(ok, "{err}");
    let own: Value = serde_json::from_str(&body).expect("JSON");
    let keys: Vec<&String> = own.as_object().expect("object").keys().collect();
    assert_eq!(
        keys,
        vec!["device-1"],
        "another identity reads only its own: {own}"
    );
    let (ok, _, err) = get(&format!("https://{server}/stats"), &cert("device-1"));
    assert!(!ok, "/stats is for readers");
    assert!(err.contains("forbidden"), "{err}");
    let (ok, body, err) = get(&latest, &[]);
    assert!(
        !ok && body.is_empty(),
        "an anonymous peer reads nothing: {body}"
    );
    assert!(err.contains("client certificate"), "{err}");

    std::thread::sleep(Duration::from_millis(300)); // published every 100 ms
    let (_, text) = http_get(&format!("http://{metrics}/metrics")).expect("metrics");
    let value = |what: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(what)?.trim().parse().ok())
    };
    assert!(
        value("quic_report_handshakes_refused_total{reason=\"no_certificate\"} ")
            .is_some_and(|n| n >= 1),
        "{text}"
    );
    assert_eq!(value("quic_report_reads_refused_total "), Some(1), "{text}");
    assert_eq!(
        value("quic_report_rejected_total{reason=\"forbidden\"} "),
        Some(0),
        "{text}"
    );
}

#[test]
fn anonymous_server_on_a_non_loopback_address_refuses_to_start_unless_allowed() {
    for listen in [
        format!("0.0.0.0:{}", free_udp_port()),
        format!("[::]:{}", free_udp_port()),
    ] {
        let out = std::process::Command::new(EXE)
            .args(["server", "--listen", &listen])
            .output()
            .expect("server runs");
        assert!(!out.status.success(), "{listen}: refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--client-ca") && err.contains("--allow-anonymous"),
            "{listen}: the reason is named: {err}"
        );
    }
    // With --allow-anonymous it serves, warns, and refuses reads.
    let port = free_udp_port();
    let listen = format!("0.0.0.0:{port}");
    let srv = common::Logged::spawn(
        "server",
        &["server", "--listen", &listen, "--allow-anonymous"],
    );
    let warning = srv.wait_for("anonymous mode");
    assert!(warning.contains("refused"), "{warning}");
    srv.wait_for("listening on");
    let (ok, _, err) = get(&format!("https://127.0.0.1:{port}/latest"), &[]);
    assert!(!ok, "reads are closed to anonymous peers off loopback");
    assert!(err.contains("forbidden"), "{err}");
    srv.kill();
}
