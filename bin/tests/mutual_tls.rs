//! The real binaries with mutual TLS on loopback: `server --client-ca`,
//! clients with the development client certificates (`certs/clients/`),
//! each record under its identity, a read side only for those allowed,
//! and anonymous mode kept to loopback unless said otherwise.

mod common;

use std::time::Duration;

use common::{
    client_args, free_tcp_port, free_udp_port, http_get, records, spawn, start_server,
    start_source, wait,
};
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
    let mut args = vec!["get", url];
    args.extend(extra.iter().map(String::as_str));
    let out = common::run_to_end(&args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn records_carry_identities_a_reader_reads_all_another_identity_only_its_own() {
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let (_source, url) = start_source();
    let ca = certs("ca.pem");
    let (_srv, server, rx) = start_server(&[
        "--metrics",
        &metrics,
        "--client-ca",
        &ca,
        "--reader",
        "ops-reader",
    ]);
    for name in ["device-1", "device-2"] {
        let mut args: Vec<String> = client_args(&server, &url, "100ms", &["--count", "3"])
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

    // Refused: the client and `get` without a certificate (one handshake
    // each: neither retries), the one read of /stats by device-1.
    let text = metrics_once_settled(
        &metrics,
        &[
            (
                "quic_report_handshakes_refused_total{reason=\"no_certificate\"}",
                2,
            ),
            ("quic_report_reads_refused_total", 1),
            ("quic_report_rejected_total{reason=\"forbidden\"}", 0),
        ],
    );
    assert!(text.is_ok(), "{}", text.unwrap_or_else(|e| e));
}

/// Polls `/metrics` (the loop publishes within 100 ms of a change) until
/// every series in `want` has its value, for at most 10 s; `Err` with the
/// last values seen if they never all did (a count off by one either way
/// never settles on the wanted one).
fn metrics_once_settled(addr: &str, want: &[(&str, u64)]) -> Result<String, String> {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = http_get(&format!("http://{addr}/metrics")).expect("metrics");
        let value = |what: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(what)?.strip_prefix(' ')?.trim().parse().ok())
        };
        let seen: Vec<(&str, Option<u64>)> = want.iter().map(|(w, _)| (*w, value(w))).collect();
        if want
            .iter()
            .zip(&seen)
            .all(|((_, n), (_, v))| *v == Some(*n))
        {
            return Ok(text);
        }
        if std::time::Instant::now() >= end {
            return Err(format!("wanted {want:?}, saw {seen:?}:\n{text}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Refused before it binds anything. (With --allow-anonymous it serves,
/// warns and refuses reads: netns.rs, in a namespace of its own, since a
/// test listens off loopback nowhere else.)
#[test]
fn anonymous_server_on_a_non_loopback_address_refuses_to_start_unless_allowed() {
    for listen in [
        format!("0.0.0.0:{}", free_udp_port()),
        format!("[::]:{}", free_udp_port()),
    ] {
        let out = common::run_to_end(&["server", "--listen", &listen]);
        assert!(!out.status.success(), "{listen}: refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--client-ca") && err.contains("--allow-anonymous"),
            "{listen}: the reason is named: {err}"
        );
    }
}

/// What one run of the attack of issue 10 left: the victim's records (its
/// identity, its `client` id), every record under that `client` id, and
/// the victim client's acknowledgement lines.
struct Attacked {
    victim_id: String,
    /// The seqs recorded under the victim's identity and client id.
    victim_seqs: Vec<u64>,
    /// The seqs recorded under the victim's client id by anyone else.
    others_seqs: Vec<u64>,
    /// The victim's `ack seq=...` lines.
    victim_acks: Vec<String>,
}

/// Victim reports made at the victim's slow interval.
const VICTIM_REPORTS: usize = 20;
/// Reports the attacker sends under the victim's client id, seqs 1..=100.
const ATTACK_REPORTS: usize = 100;

/// The attack of issue 10 on the real binaries: a victim client reports
/// every 250 ms; once its first record shows its `client` id, an attacker
/// reports 100 times under that id (`--client-id`) every 20 ms, so it runs
/// ahead of the victim's seqs. With `mtls`, the server requires client
/// certificates: the victim is device-1, the attacker device-2, and a
/// second attacker without a certificate tries too (refused).
fn attack(mtls: bool) -> Attacked {
    let (_source, url) = start_source();
    let ca = certs("ca.pem");
    let server_extra: &[&str] = if mtls { &["--client-ca", &ca] } else { &[] };
    let (_srv, server, rx) = start_server(server_extra);
    let client = |interval: &str, count: usize, extra: &[String]| {
        let count = count.to_string();
        let mut args = client_args(&server, &url, interval, &["--count", &count]);
        args.extend(extra.iter().map(String::as_str));
        common::Logged::spawn("client", &args)
    };
    let victim_identity = if mtls { "device-1" } else { "" };
    let victim = client(
        "250ms",
        VICTIM_REPORTS,
        &if mtls {
            cert("device-1").to_vec()
        } else {
            vec![]
        },
    );
    // The attacker learns the victim's client id (here: from its first
    // record; in the README, from /latest).
    let mut got = Vec::new();
    records(&rx, &mut got, 1, Duration::from_secs(30));
    let victim_id = got
        .first()
        .and_then(|r| r["client"].as_str())
        .expect("the victim's first record")
        .to_owned();
    let claim = ["--client-id".to_owned(), victim_id.clone()];
    let mut attackers = Vec::new();
    let mut with_cert = claim.to_vec();
    if mtls {
        with_cert.extend(cert("device-2"));
        // Without a certificate: refused at the handshake, says why.
        let mut bare = client("20ms", ATTACK_REPORTS, &claim);
        let status = bare.wait(Duration::from_secs(30));
        assert!(!status.success(), "refused: {status:?}");
        let said = bare.lines_so_far().join("\n");
        assert!(said.contains("requires a client certificate"), "{said}");
    }
    attackers.push(client("20ms", ATTACK_REPORTS, &with_cert));
    for a in attackers {
        let (status, _) = a.finish();
        assert!(status.success(), "the attacker's reports are acknowledged");
    }
    let (status, out) = victim.finish();
    assert!(status.success(), "the victim exits 0: {status:?}");
    let victim_acks: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("ack seq="))
        .map(str::to_owned)
        .collect();
    assert_eq!(victim_acks.len(), VICTIM_REPORTS, "{out}");
    // Everything recorded by now (the clients saw every answer); a short
    // wait for anything recorded twice.
    let fresh = victim_acks
        .iter()
        .filter(|l| !l.contains("(duplicate)"))
        .count();
    let expected = ATTACK_REPORTS + fresh;
    records(&rx, &mut got, expected + 1, Duration::from_secs(1));
    let seqs = |mine: bool| -> Vec<u64> {
        let mut v: Vec<u64> = got
            .iter()
            .filter(|r| r["client"] == victim_id.as_str())
            .filter(|r| mtls && (r["identity"] == victim_identity) == mine || !mtls && !mine)
            .filter_map(|r| r["seq"].as_u64())
            .collect();
        v.sort_unstable();
        v
    };
    Attacked {
        victim_seqs: seqs(true),
        others_seqs: seqs(false),
        victim_id,
        victim_acks,
    }
}

#[test]
fn second_identity_and_no_certificate_claiming_a_victims_client_id_make_it_lose_nothing() {
    let a = attack(true);
    assert_eq!(
        a.victim_seqs,
        (1..=VICTIM_REPORTS as u64).collect::<Vec<_>>(),
        "every one of the victim's reports recorded once under device-1 (client {})",
        a.victim_id
    );
    assert_eq!(
        a.others_seqs,
        (1..=ATTACK_REPORTS as u64).collect::<Vec<_>>(),
        "the attacker's recorded under device-2, beside them"
    );
    let duplicates: Vec<&String> = a
        .victim_acks
        .iter()
        .filter(|l| l.contains("(duplicate)"))
        .collect();
    assert!(
        duplicates.is_empty(),
        "none of the victim's reports answered duplicate: {duplicates:?}"
    );
}

#[test]
fn anonymous_server_lets_a_peer_claiming_a_victims_client_id_swallow_its_reports() {
    // The same attack without --client-ca (what the README's Security table
    // says of anonymous mode): the attacker's seqs run ahead, and the
    // victim's later reports are answered duplicate and never recorded.
    let a = attack(false);
    let lost = a
        .victim_acks
        .iter()
        .filter(|l| l.contains("(duplicate)"))
        .count();
    assert!(
        lost > 0,
        "the victim lost reports to the attacker: {:?}",
        a.victim_acks
    );
    assert_eq!(
        a.others_seqs,
        (1..=ATTACK_REPORTS as u64).collect::<Vec<_>>(),
        "one namespace: each seq of the client id recorded once, whoever sent it"
    );
}

#[test]
fn own_latest_from_a_database_is_complete_behind_many_other_identities() {
    // /latest for a non-reader comes from the database with its identity
    // in the query: 10,000 clients of an identity sorting first (the
    // database read's row limit) must not crowd out device-1's own.
    let tmp = common::TempPath::new("own-latest");
    let dir = tmp.0.clone();
    std::fs::create_dir_all(&dir).expect("temp dir");
    let db = dir.join("reports.db");
    let server = format!("127.0.0.1:{}", free_udp_port());
    let (_source, url) = start_source();
    let (ca, sink) = (certs("ca.pem"), format!("sqlite:{}", db.display()));
    let srv = common::Logged::spawn(
        "server",
        &[
            "server",
            "--listen",
            &server,
            "--client-ca",
            &ca,
            "--sink",
            &sink,
        ],
    );
    srv.wait_for("listening on");
    let mut args: Vec<String> = client_args(&server, &url, "50ms", &["--count", "2"])
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(cert("device-1"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, _) = common::Logged::spawn("client", &args).finish();
    assert!(status.success(), "{status:?}");
    {
        let mut c = rusqlite::Connection::open(&db).expect("opens the server's database");
        c.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        let tx = c.transaction().expect("transaction");
        {
            let mut ins = tx
                .prepare(
                    "INSERT INTO reports (identity, client, seq, received_at, body) \
                     VALUES ('a-filler', ?1, 1, '2024-01-01T00:00:00Z', '{}')",
                )
                .expect("the server's table");
            for i in 0..10_000 {
                ins.execute([format!("c{i:05}")]).expect("inserts");
            }
        }
        tx.commit().expect("commits");
    }
    let (ok, body, err) = get(&format!("https://{server}/latest"), &cert("device-1"));
    assert!(ok, "{err}");
    let own: Value = serde_json::from_str(&body).expect("JSON");
    let mine = own["device-1"].as_object().expect("device-1's entries");
    assert_eq!(mine.len(), 1, "{own}");
    assert_eq!(
        mine.values().next().map(|r| r["seq"].clone()),
        Some(2.into())
    );
    assert!(own.get("a-filler").is_none(), "only its own: {own}");
    srv.kill();
}

#[test]
fn client_id_must_be_hex_and_match_the_spool_it_continues() {
    let run = |args: &[&str]| {
        let mut all = vec!["client"];
        all.extend_from_slice(args);
        let out = common::run_to_end(&all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["--client-id", "not-hex", "--count", "1"]);
    assert!(!ok && err.contains("not a hex digit"), "{err}");
    let (ok, err) = run(&["--client-id", &"a".repeat(65), "--count", "1"]);
    assert!(!ok && err.contains("1 to 64"), "{err}");

    // A spool made under one id is refused under another, saying both.
    let tmp = common::TempPath::new("client-id-spool");
    let dir = tmp.0.clone();
    let spool = dir.to_str().expect("UTF-8 path");
    let server = format!("127.0.0.1:{}", free_udp_port()); // nobody there
    let spooled = |id: &str| {
        common::Logged::spawn(
            "client",
            &[
                "client",
                "--server",
                &server,
                "--spool",
                spool,
                "--client-id",
                id,
            ],
        )
    };
    let first = spooled("C0FFEE");
    let said = first.wait_for("spool ");
    assert!(said.contains("client id c0ffee"), "lowered: {said}");
    first.kill();
    let (ok, err) = run(&["--server", &server, "--spool", spool, "--client-id", "beef"]);
    assert!(!ok, "refused");
    assert!(
        err.contains("belongs to client c0ffee") && err.contains("beef"),
        "{err}"
    );
    // Its own id (or none) continues it.
    let again = spooled("c0ffee");
    assert!(again.wait_for("spool ").contains("client id c0ffee"));
    again.kill();
}
