//! Control-plane benchmark: enrollments per second end to end over loopback (token check, CSR
//! verification, signing, the SQLite commit and both TLS handshakes), sequential and with
//! concurrent enrollees, against the target in the issue. Prints a table.

use std::time::{Duration, Instant};

use http::Method;
use umbra_policies::{IdentityKind, Name};
use umbra_proto::api::{CreateIdentityRequest, TokenResponse};
use umbra_tests::TestController;

const SEQUENTIAL: usize = 100;
const CONCURRENT: usize = 400;
const WORKERS: usize = 8;
const TARGET_PER_SEC: f64 = 200.0;

async fn tokens(t: &TestController, prefix: &str, n: usize) -> Vec<String> {
    let c = t.admin_client();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let req = CreateIdentityRequest {
            name: Name::new(format!("{prefix}-{i}")).expect("name"),
            kind: IdentityKind::Agent,
            roles: vec![],
            token_ttl_secs: None,
        };
        let r: TokenResponse = c
            .call(Method::POST, "/v1/identities", Some(&req))
            .await
            .expect("create");
        out.push(r.token);
    }
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let t = TestController::start().await;
        let addr = t.addr();

        // Sequential: one enrollee at a time, per-enrollment latency.
        let toks = tokens(&t, "seq", SEQUENTIAL).await;
        let mut lat = Vec::with_capacity(SEQUENTIAL);
        let start = Instant::now();
        for tok in &toks {
            let s = Instant::now();
            umbra_sdk::enroll(tok, Some(&addr)).await.expect("enroll");
            lat.push(s.elapsed());
        }
        let seq_rate = SEQUENTIAL as f64 / start.elapsed().as_secs_f64();
        lat.sort();

        // Concurrent: WORKERS enrollees at once.
        let toks = tokens(&t, "par", CONCURRENT).await;
        let chunks: Vec<Vec<String>> = toks
            .chunks(CONCURRENT / WORKERS)
            .map(|c| c.to_vec())
            .collect();
        let start = Instant::now();
        let mut tasks = Vec::new();
        for chunk in chunks {
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                for tok in chunk {
                    umbra_sdk::enroll(&tok, Some(&addr)).await.expect("enroll");
                }
            }));
        }
        for task in tasks {
            task.await.expect("join");
        }
        let par_rate = CONCURRENT as f64 / start.elapsed().as_secs_f64();

        let verdict = |v: f64| if v >= TARGET_PER_SEC { "pass" } else { "MISS" };
        println!();
        println!(
            "{:<44} {:>14} {:>12} {:>6}",
            "control plane (loopback, 2 cores)", "measured", "target", ""
        );
        println!(
            "{:<44} {:>12.0}/s {:>10}/s {:>6}",
            "enrollments, sequential",
            seq_rate,
            TARGET_PER_SEC,
            verdict(seq_rate)
        );
        println!(
            "{:<44} {:>12.0}/s {:>10}/s {:>6}",
            format!("enrollments, {WORKERS} concurrent enrollees"),
            par_rate,
            TARGET_PER_SEC,
            verdict(par_rate)
        );
        println!(
            "{:<44} {:>12.2?} {:>12}",
            "enrollment latency p50",
            pct(&lat, 0.5),
            "-"
        );
        println!(
            "{:<44} {:>12.2?} {:>12}",
            "enrollment latency p99",
            pct(&lat, 0.99),
            "-"
        );
    });
}
