//! `charge-bench`: how many application charges a relay acknowledges durably over gRPC.
//!
//! Starts `relay serve --grpc` (the release binary beside this one) on a fresh SQLite file or a
//! throwaway PostgreSQL database, makes an application server with a billing token and one
//! established session of its, then sends `--charges N` distinct charges from `--streams S`
//! concurrent callers in `ReportCharges` calls of `--batch B` charges (repeat `--batch` for
//! several runs), each counted only once it is answered `recorded`. Prints, per batch size,
//! charges per second, the p50/p99/max time of a call's answer, and the relay's CPU per 1,000
//! charges; checks that the ledger holds exactly the charges sent. Run by `cargo xtask bench
//! --mode charges`.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use proto::grpc::relay_v1 as v1;
use relay::store::{Cdr, CdrState, Store};
use tests::harness::Db;
use tests::pg::PgCluster;
use tests::procs::RelayProc;
use v1::billing_client::BillingClient;

struct Options {
    db: Db,
    charges: usize,
    batches: Vec<usize>,
    streams: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        db: Db::Sqlite,
        charges: 100_000,
        batches: Vec::new(),
        streams: 16,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--store" => {
                o.db = match value()?.as_str() {
                    "sqlite" => Db::Sqlite,
                    "postgres" => Db::Postgres,
                    other => bail!("--store sqlite|postgres, not {other:?}"),
                }
            }
            "--charges" => o.charges = value()?.parse().context("--charges")?,
            "--batch" => o.batches.push(value()?.parse().context("--batch")?),
            "--streams" => o.streams = value()?.parse().context("--streams")?,
            other => {
                bail!("unknown option {other:?} (known: --store, --charges, --batch, --streams)")
            }
        }
    }
    if o.batches.is_empty() {
        o.batches = vec![1, 100, 1000];
    }
    if o.charges == 0 || o.streams == 0 || o.batches.contains(&0) {
        bail!("--charges, --streams and --batch must be above 0");
    }
    Ok(o)
}

fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    // A cluster of its own, stopped when this ends.
    let cluster = match o.db {
        Db::Postgres => Some(PgCluster::start()?),
        Db::Sqlite => None,
    };
    let relay = match &cluster {
        Some(c) => RelayProc::start_on(&c.fresh_database()?, "grpc = \"127.0.0.1:0\"").await?,
        None => RelayProc::start(Db::Sqlite, "grpc = \"127.0.0.1:0\"").await?,
    };
    let pid = relay.pid().context("the relay is not running")?;
    relay.admin(&[
        "service",
        "add",
        "wine",
        "--per-minute",
        "120",
        "--currency",
        "EUR",
    ])?;
    relay.admin(&[
        "appserver",
        "add",
        "vendor",
        "--password",
        "vendor-pw",
        "--service",
        "wine",
    ])?;
    let token = relay
        .admin(&["appserver", "token", "vendor"])?
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    // One established session of this server, as the relay would have recorded it.
    let store = Store::open(&relay.db_url).await?;
    let sid = uuid::Uuid::new_v4().to_string();
    let now = proto::clock::now_ms();
    store
        .save_cdrs(&[Cdr {
            id: sid.clone(),
            call_id: format!("bench-{sid}"),
            caller: "alice".into(),
            callee: "wine".into(),
            created_at_ms: now,
            started_at_ms: Some(now),
            state: CdrState::Established,
            service: Some("wine".into()),
            server: Some("vendor".into()),
            ..Cdr::default()
        }])
        .await?;
    let addr = relay.grpc.context("the relay serves no gRPC")?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    println!(
        "== gRPC charge ingestion on {}: {} charges per run, {} streams, relay PID {pid}",
        match o.db {
            Db::Sqlite => "SQLite",
            Db::Postgres => "PostgreSQL",
        },
        o.charges,
        o.streams
    );
    println!("batch  charges/s   p50 ms   p99 ms   max ms  CPU-s/1k  recorded");
    let mut total = 0usize;
    for (run, &batch) in o.batches.iter().enumerate() {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let cpu0 = cpu_seconds(pid)?;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..o.streams {
            let mut client = BillingClient::new(channel.clone());
            let next = next.clone();
            let auth = auth.clone();
            let sid = sid.clone();
            let n = o.charges;
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                let mut recorded = 0usize;
                loop {
                    let from = next.fetch_add(batch, std::sync::atomic::Ordering::Relaxed);
                    if from >= n {
                        break;
                    }
                    let to = (from + batch).min(n);
                    let charges = (from..to)
                        .map(|i| v1::Charge {
                            session_id: sid.clone(),
                            idempotency_key: format!("run{run}-{i}"),
                            item_id: "riesling".into(),
                            item_name: "Riesling".into(),
                            unit_price_minor: 1250,
                            quantity: 1,
                            currency: "EUR".into(),
                            ..v1::Charge::default()
                        })
                        .collect();
                    let mut req = tonic::Request::new(v1::ReportChargesRequest { charges });
                    req.metadata_mut().insert("authorization", auth.clone());
                    let t = Instant::now();
                    let resp = client.report_charges(req).await?;
                    times.push(t.elapsed());
                    recorded += resp
                        .into_inner()
                        .results
                        .iter()
                        .filter(|r| r.outcome == v1::Outcome::Recorded as i32)
                        .count();
                }
                anyhow::Ok((times, recorded))
            }));
        }
        let mut times = Vec::new();
        let mut recorded = 0;
        for t in tasks {
            let (ts, r) = t.await??;
            times.extend(ts);
            recorded += r;
        }
        let took = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid)? - cpu0;
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{batch:>5} {:>10.0} {:>8.1} {:>8.1} {:>8.1} {:>9.3} {recorded:>9}",
            recorded as f64 / took,
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(times.last().copied().unwrap_or_default()),
            cpu / (o.charges as f64 / 1000.0),
        );
        if recorded != o.charges {
            bail!("{recorded} of {} charges recorded", o.charges);
        }
        total += recorded;
    }
    let in_ledger = store.session_charges(&sid).await?.len();
    if in_ledger != total {
        bail!("the ledger holds {in_ledger} charges, {total} were acknowledged");
    }
    println!("ledger: {in_ledger} charges, each acknowledged once");
    if std::env::var_os("CHARGE_BENCH_LOG").is_some() {
        println!("--- relay log ---\n{}", relay.log.text());
    }
    drop(relay);
    drop(cluster);
    Ok(())
}
