//! Replays the committed corpus (`fuzz/corpus/<target>/`) and any saved crash
//! (`fuzz/crashes/<target>/`, which should be fixed and moved into the corpus) through
//! its target, on a thread with a Tokio worker's stack (2 MiB), as an ordinary test.

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

fn replay(name: &str, min_files: usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = files(&root.join("corpus").join(name));
    assert!(
        corpus.len() >= min_files,
        "{name}: only {} corpus files",
        corpus.len()
    );
    let mut all = corpus;
    all.extend(files(&root.join("crashes").join(name)));
    let t = gs_fuzz::target(name).expect("a target");
    let name = name.to_string();
    std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            for path in all {
                let input = std::fs::read(&path).expect("read a corpus file");
                if std::panic::catch_unwind(|| t(&input)).is_err() {
                    panic!("{name}: {} fails", path.display());
                }
            }
        })
        .expect("spawn")
        .join()
        .expect("every corpus input passes");
}

#[test]
fn client_message_corpus() {
    replay("client_message", 20);
}

#[test]
fn pointer_corpus() {
    replay("pointer", 20);
}

#[test]
fn decide_corpus() {
    replay("decide", 20);
}

#[test]
fn token_corpus() {
    replay("token", 20);
}

/// Every target takes any bytes: a few fixed odd inputs beside the corpus.
#[test]
fn targets_take_any_bytes() {
    let odd: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0xff; 64],
        b"{".to_vec(),
        b"[".repeat(10_000),
        (0..=255u8).collect(),
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    ];
    std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            for (name, t) in gs_fuzz::TARGETS {
                for input in &odd {
                    t(input);
                }
                let _ = name;
            }
        })
        .expect("spawn")
        .join()
        .expect("no target panics on odd bytes");
}
