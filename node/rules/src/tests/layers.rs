//! The modules of the crate import each other without circles: plain data at the
//! bottom (`types`, `encounter`), descriptions (`command`, `event`) above it, then
//! `game`, then the rules that change play and `state` (see `lib.rs`).

use std::collections::{BTreeMap, BTreeSet};

/// The modules a source file names (`crate::x`), outside comments and its tests.
fn imports(src: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let code: String = src
        .split("#[cfg(test)]")
        .next()
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    for part in code.split("crate::").skip(1) {
        let names: Vec<&str> = match part.strip_prefix('{') {
            Some(list) => list
                .split('}')
                .next()
                .unwrap_or_default()
                .split(',')
                .map(|n| n.trim().split("::").next().unwrap_or_default())
                .collect(),
            None => vec![part
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or_default()],
        };
        found.extend(
            names
                .into_iter()
                .filter(|n| modules.contains(*n))
                .map(str::to_string),
        );
    }
    found
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sources = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            sources.insert(name, std::fs::read_to_string(&path).unwrap());
        }
    }
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    assert!(modules.contains("types") && modules.contains("state"));
    let graph: BTreeMap<String, BTreeSet<String>> = sources
        .iter()
        .map(|(m, src)| {
            let mut deps = imports(src, &modules);
            deps.remove(m);
            (m.clone(), deps)
        })
        .collect();
    assert!(
        graph["types"].is_empty(),
        "types imports {:?}",
        graph["types"]
    );
    // Depth-first search; a module met again on the current path closes a circle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            panic!("import circle: {:?} -> {m}", &path[at..]);
        }
        path.push(m.to_string());
        for d in &graph[m] {
            visit(d, graph, path, done);
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut vec![], &mut done);
    }
}
