//! A bounded, seeded, mutation-based fuzz driver for the `gs_fuzz` targets (for
//! machines without a nightly toolchain for cargo-fuzz).
//!
//! ```text
//! cargo run --release -p gs-fuzz --bin fuzz -- --target decide --seconds 60 --seed 1
//! cargo run --release -p gs-fuzz --bin fuzz -- --target all --seconds 60
//! ```
//!
//! It starts from the committed corpus (`fuzz/corpus/<target>/`), mutates inputs
//! (`gs_fuzz::mutate`: bytes, splices, dictionary tokens, JSON-aware mutations) and
//! keeps those that show a new feature of the target's [`gs_fuzz::Trace`]. Each input
//! runs under `catch_unwind` on a thread with a 2 MiB stack (a Tokio worker's), so a
//! panic is caught and its input saved to `fuzz/crashes/<target>/`. An abort (a stack
//! overflow) kills the process: the driver therefore runs the fuzzing in a child
//! process that writes each input to a file before running it; when the child dies,
//! the parent saves that input as a crash and starts a new child for the time left.
//! A child that reports no progress for 20 s is killed and its input saved as a hang.
//!
//! Prints one summary line per target (`execs`, `crashes`, `corpus`, `pool`) and
//! exits with 1 when anything crashed or hung.

use gs_fuzz::mutate::{mutate, Rng};
use gs_fuzz::{target, Target, TARGETS};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAX_LEN: usize = 128 * 1024;
const POOL_MAX: usize = 4096;
const STACK: usize = 2 * 1024 * 1024;
const HANG: Duration = Duration::from_secs(20);

struct Args {
    target: String,
    seconds: u64,
    seed: u64,
    corpus: PathBuf,
    crashes: PathBuf,
    worker: Option<PathBuf>,
    replay: Vec<PathBuf>,
}

fn usage() -> ! {
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    eprintln!(
        "usage: fuzz --target <{}|all> [--seconds N] [--seed S] [--corpus DIR] [--crashes DIR] [--replay FILE]...",
        names.join("|")
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut a = Args {
        target: String::new(),
        seconds: 60,
        seed: 1,
        corpus: root.join("corpus"),
        crashes: root.join("crashes"),
        worker: None,
        replay: vec![],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--target" => a.target = val(),
            "--seconds" => a.seconds = val().parse().unwrap_or_else(|_| usage()),
            "--seed" => a.seed = val().parse().unwrap_or_else(|_| usage()),
            "--corpus" => a.corpus = val().into(),
            "--crashes" => a.crashes = val().into(),
            "--worker" => a.worker = Some(val().into()),
            "--replay" => a.replay.push(val().into()),
            _ => usage(),
        }
    }
    if a.target != "all" && target(&a.target).is_none() {
        usage();
    }
    a
}

fn main() {
    let args = parse_args();
    if !args.replay.is_empty() {
        // Runs the files through the target, uncaught: the panic and its message show.
        let t = target(&args.target).unwrap_or_else(|| usage());
        let files = args.replay.clone();
        std::thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || {
                for f in files {
                    let input = std::fs::read(&f).expect("read the input");
                    t(&input);
                    println!("{}: ok", f.display());
                }
            })
            .expect("spawn")
            .join()
            .ok();
        return;
    }
    if let Some(current) = &args.worker {
        worker(&args, current);
        return;
    }
    let names: Vec<String> = if args.target == "all" {
        TARGETS.iter().map(|(n, _)| n.to_string()).collect()
    } else {
        vec![args.target.clone()]
    };
    let mut failed = false;
    for name in names {
        failed |= supervise(&args, &name);
    }
    std::process::exit(i32::from(failed));
}

/// Per-target totals.
#[derive(Default)]
struct Totals {
    execs: u64,
    crashes: u64,
    hangs: u64,
    aborts: u64,
    corpus: u64,
    pool: u64,
}

/// Runs workers for `name` until its time is up; returns whether anything failed.
fn supervise(args: &Args, name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let exe = std::env::current_exe().expect("the driver's own path");
    let current = std::env::temp_dir().join(format!("gs-fuzz-{}-{name}.cur", std::process::id()));
    let mut totals = Totals::default();
    let mut seed = args.seed;
    let start = Instant::now();
    while Instant::now() < deadline {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_secs()
            .max(1);
        let mut child = Command::new(&exe)
            .args(["--target", name, "--seconds", &left.to_string()])
            .args(["--seed", &seed.to_string()])
            .arg("--corpus")
            .arg(&args.corpus)
            .arg("--crashes")
            .arg(&args.crashes)
            .arg("--worker")
            .arg(&current)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a worker");
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut last = Stats::default();
        let mut hung = false;
        loop {
            match rx.recv_timeout(HANG) {
                Ok(line) => {
                    if let Some(s) = Stats::parse(&line) {
                        last = s;
                    } else if line.starts_with("CRASH ") {
                        eprintln!("[{name}] {line}");
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    hung = true;
                    let _ = child.kill();
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = child.wait().expect("wait for the worker");
        totals.execs += last.execs;
        totals.crashes += last.crashes;
        totals.corpus = last.corpus;
        totals.pool = totals.pool.max(last.pool);
        if hung || !status.success() {
            let kind = if hung { "hang" } else { "abort" };
            if hung {
                totals.hangs += 1;
            } else {
                totals.aborts += 1;
            }
            match read_current(&current) {
                Some(input) => {
                    let path = save(&args.crashes, name, kind, &input);
                    eprintln!(
                        "[{name}] worker {kind} ({status}); input saved to {}",
                        path.display()
                    );
                }
                None => eprintln!("[{name}] worker {kind} ({status}); no input recorded"),
            }
            seed = seed.wrapping_add(0x1_0000);
        } else {
            break;
        }
    }
    let _ = std::fs::remove_file(&current);
    let failed = totals.crashes + totals.hangs + totals.aborts;
    println!(
        "{name}: execs={} crashes={} aborts={} hangs={} corpus={} pool={} seconds={:.0} execs/s={:.0}",
        totals.execs,
        totals.crashes,
        totals.aborts,
        totals.hangs,
        totals.corpus,
        totals.pool,
        start.elapsed().as_secs_f64(),
        totals.execs as f64 / start.elapsed().as_secs_f64().max(1e-9)
    );
    failed > 0
}

#[derive(Default, Clone, Copy)]
struct Stats {
    execs: u64,
    crashes: u64,
    corpus: u64,
    pool: u64,
}

impl Stats {
    fn line(&self) -> String {
        format!(
            "STAT execs={} crashes={} corpus={} pool={}",
            self.execs, self.crashes, self.corpus, self.pool
        )
    }

    fn parse(line: &str) -> Option<Stats> {
        let rest = line.strip_prefix("STAT ")?;
        let mut s = Stats::default();
        for kv in rest.split(' ') {
            let (k, v) = kv.split_once('=')?;
            let v: u64 = v.parse().ok()?;
            match k {
                "execs" => s.execs = v,
                "crashes" => s.crashes = v,
                "corpus" => s.corpus = v,
                "pool" => s.pool = v,
                _ => {}
            }
        }
        Some(s)
    }
}

/// The input a dead worker was running (`len` as 8 bytes, then the bytes).
fn read_current(path: &Path) -> Option<Vec<u8>> {
    let b = std::fs::read(path).ok()?;
    let len = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    b.get(8..8 + len).map(<[u8]>::to_vec)
}

/// Saves a failing input as `crashes/<target>/<kind>-<hash>`.
fn save(dir: &Path, name: &str, kind: &str, input: &[u8]) -> PathBuf {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    input.hash(&mut h);
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).expect("create the crashes directory");
    let path = dir.join(format!("{kind}-{:016x}", h.finish()));
    std::fs::write(&path, input).expect("save a crashing input");
    path
}

/// The message of the last panic (the hook keeps it instead of printing it).
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

fn worker(args: &Args, current: &Path) {
    let name = args.target.clone();
    let t = target(&name).expect("checked");
    std::panic::set_hook(Box::new(|info| {
        let mut m = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
        *m = info.to_string();
    }));
    let seconds = args.seconds;
    let seed = args.seed;
    let corpus = args.corpus.join(&name);
    let crashes = args.crashes.clone();
    let current = current.to_path_buf();
    // A Tokio worker's stack: what the rules run on in a node.
    let h = std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || fuzz_loop(&name, t, &corpus, &crashes, &current, seconds, seed))
        .expect("spawn the fuzzing thread");
    h.join().expect("the fuzzing loop does not panic");
}

fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

fn fuzz_loop(
    name: &str,
    t: Target,
    corpus: &Path,
    crashes: &Path,
    current: &Path,
    seconds: u64,
    seed: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let cur = std::fs::File::create(current).expect("create the current-input file");
    let mut pool = load_corpus(corpus);
    let corpus_len = pool.len() as u64;
    if pool.is_empty() {
        pool.push(b"{}".to_vec());
    }
    let mut rng = Rng::new(seed);
    let mut seen: HashSet<u64> = HashSet::new();
    let mut crash_msgs: HashSet<String> = HashSet::new();
    let mut stats = Stats {
        corpus: corpus_len,
        ..Stats::default()
    };
    let mut next_report = Instant::now();
    let mut out = std::io::stdout();
    let mut i = 0usize;
    loop {
        // The corpus first, as is; then mutations.
        let input = if i < pool.len() && (i as u64) < corpus_len {
            pool[i].clone()
        } else {
            let a = rng.below(pool.len());
            let b = rng.below(pool.len());
            mutate(&mut rng, &pool[a], &pool[b], MAX_LEN)
        };
        i += 1;
        let mut header = (input.len() as u64).to_le_bytes().to_vec();
        header.extend_from_slice(&input);
        let _ = cur.write_all_at(&header, 0);
        let r = std::panic::catch_unwind(|| t(&input));
        stats.execs += 1;
        match r {
            Ok(trace) => {
                let new = trace.features.iter().filter(|f| seen.insert(**f)).count();
                if new > 0 && pool.len() < POOL_MAX {
                    pool.push(input);
                }
            }
            Err(_) => {
                stats.crashes += 1;
                let msg = LAST_PANIC.lock().map(|m| m.clone()).unwrap_or_default();
                let path = save(crashes, name, "panic", &input);
                // One line per distinct panic site.
                let site = msg.lines().next().unwrap_or("").to_string();
                if crash_msgs.insert(site.clone()) {
                    let _ = writeln!(out, "CRASH {} {}", path.display(), site);
                }
            }
        }
        stats.pool = pool.len() as u64;
        let now = Instant::now();
        if now >= next_report {
            let _ = writeln!(out, "{}", stats.line());
            let _ = out.flush();
            next_report = now + Duration::from_secs(1);
        }
        if now >= deadline {
            break;
        }
    }
    let _ = writeln!(out, "{}", stats.line());
    let _ = out.flush();
}
