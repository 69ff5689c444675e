//! `gs-deploy-check [ROOT]`: checks the repository's deployment manifests (see the
//! library) and prints every problem; exit status 1 when there is one.

fn main() -> std::process::ExitCode {
    let root = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(gs_deploy_check::repo_root);
    match gs_deploy_check::repo::check(&root) {
        Ok(report) => {
            for line in &report.checked {
                println!("checked  {line}");
            }
            for p in &report.problems {
                println!("PROBLEM  {p}");
            }
            println!(
                "{} objects checked, {} problems",
                report.checked.len(),
                report.problems.len()
            );
            if report.problems.is_empty() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("gs-deploy-check: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
