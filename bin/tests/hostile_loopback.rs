//! The real server facing hostile input on loopback: tens of thousands of
//! junk datagrams leave it serving, and answered with fewer bytes than they
//! carried; a client refuses a server whose certificate our CA did not sign,
//! by name, unless run with `--insecure`.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::{client_args, records, spawn, start_server, start_source, stderr_of, wait};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

fn cert(name: &str) -> String {
    format!("{}/../certs/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// One junk datagram: noise, a version-1 or odd-version long header, or a
/// short header for a connection the server never issued.
fn junk(rng: &mut StdRng) -> Vec<u8> {
    let len = if rng.random_bool(0.3) {
        1200 + rng.random_range(0..150)
    } else {
        rng.random_range(1..1400)
    };
    let mut d = vec![0u8; len];
    rng.fill_bytes(&mut d);
    match rng.random_range(0..4) {
        0 => {} // noise
        1 | 2 if len >= 7 => {
            d[0] |= 0xc0; // long header
            let version: u32 = if rng.random_bool(0.5) {
                1
            } else {
                rng.random()
            };
            d[1..5].copy_from_slice(&version.to_be_bytes());
            d[5] = rng.random_range(0..21); // DCID length
        }
        _ => {
            d[0] = 0x40 | (d[0] & 0x3f); // short header, random 16-byte CID
        }
    }
    d
}

#[test]
fn junk_datagrams_leave_the_real_server_serving() {
    let (_source, url) = start_source();
    let (mut server, server_addr, rx) = start_server(&[]);

    let sock = UdpSocket::bind("127.0.0.1:0").expect("a socket");
    sock.connect(&server_addr).expect("connect");
    sock.set_nonblocking(true).expect("non-blocking");
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let (mut sent, mut answered, mut buf) = (0usize, 0usize, vec![0u8; 65535]);
    let count = 30_000;
    for i in 0..count {
        let d = junk(&mut rng);
        if sock.send(&d).is_ok() {
            sent += d.len();
        }
        if i % 64 == 0 {
            std::thread::sleep(Duration::from_micros(200)); // do not overflow the socket buffer
        }
        while let Ok(n) = sock.recv(&mut buf) {
            answered += n;
        }
    }
    let end = Instant::now() + Duration::from_millis(500);
    while Instant::now() < end {
        match sock.recv(&mut buf) {
            Ok(n) => answered += n,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    eprintln!("junk: {count} datagrams, {sent} bytes sent, {answered} bytes answered");
    assert!(
        answered <= sent,
        "no amplification: {answered} bytes answered to {sent} bytes of junk"
    );
    assert!(
        server.child.try_wait().ok().flatten().is_none(),
        "the server is still running"
    );

    let mut client = spawn(
        "client",
        &client_args(&server_addr, &url, "200ms", &["--count", "3"]),
    );
    let status = wait(&mut client, Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "client exits 0: {status:?}\n{}",
        stderr_of(&mut client)
    );
    let mut got = Vec::new();
    records(&rx, &mut got, 3, Duration::from_secs(5));
    assert_eq!(
        got.len(),
        3,
        "the honest client's reports were recorded: {got:?}"
    );
}

#[test]
fn client_refuses_a_server_our_ca_did_not_sign_unless_insecure() {
    let (_source, url) = start_source();
    let (c, k) = (cert("test/untrusted.pem"), cert("test/untrusted.key"));
    let (_server, server_addr, rx) = start_server(&["--cert", &c, "--key", &k]);
    let args = client_args(&server_addr, &url, "200ms", &["--count", "2"]);

    let mut refused = spawn("client", &args);
    let status = wait(&mut refused, Duration::from_secs(30));
    let err = stderr_of(&mut refused);
    assert!(
        status.is_some_and(|s| !s.success()),
        "exits non-zero: {status:?}\n{err}"
    );
    assert!(err.contains("unknown issuer"), "names the problem:\n{err}");
    let mut got = Vec::new();
    records(&rx, &mut got, 1, Duration::from_millis(300));
    assert!(got.is_empty(), "nothing recorded: {got:?}");

    let mut insecure_args = args.clone();
    insecure_args.push("--insecure");
    let mut insecure = spawn("client", &insecure_args);
    let status = wait(&mut insecure, Duration::from_secs(30));
    let err = stderr_of(&mut insecure);
    assert!(
        status.is_some_and(|s| s.success()),
        "--insecure succeeds: {status:?}\n{err}"
    );
    assert!(err.to_lowercase().contains("insecure"), "and warns:\n{err}");
    records(&rx, &mut got, 2, Duration::from_secs(5));
    assert_eq!(got.len(), 2);
}
