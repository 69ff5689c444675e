//! A small Chrome DevTools Protocol driver for the browser test: starts headless
//! Chromium (Debian's `chromium` package, installed by `scripts/services.sh`), opens
//! pages, evaluates JavaScript in them, waits for conditions with deadlines, and
//! takes screenshots. One WebSocket to the browser; pages are attached with
//! `flatten: true` sessions, so every command is `{id, method, params, sessionId}`.

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the browser may take to start and print its DevTools address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value>>>>>;

/// The Chromium executable: `$GS_CHROMIUM`, else the first of `chromium`,
/// `chromium-browser`, `google-chrome` on the `PATH`.
pub fn find_chromium() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("GS_CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "no Chromium found (looked for chromium, chromium-browser, google-chrome on PATH, and \
         $GS_CHROMIUM): the browser test needs it. scripts/services.sh installs Debian's \
         `chromium` package (apt-get install chromium)"
    )
}

/// A running headless browser.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    /// Console errors and uncaught exceptions, per page session.
    pub problems: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Browser {
    /// Starts headless Chromium with a private profile and connects to it.
    pub async fn launch() -> Result<Browser> {
        let exe = find_chromium()?;
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(&exe)
            .args([
                "--headless=new",
                "--no-sandbox", // CI runs as root
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-background-timer-throttling",
                "--disable-backgrounding-occluded-windows",
                "--disable-renderer-backgrounding",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1100,1500",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let ws_url = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(i) = line.find("ws://") {
                    return Ok(line[i..].trim().to_string());
                }
                seen.push(line);
            }
            Err(anyhow!("the browser exited"))
        })
        .await
        .map_err(|_| anyhow!("no DevTools address within {START_TIMEOUT:?}"))
        .and_then(|r| r)
        .with_context(|| format!("{} did not start: {}", exe.display(), seen.join("\n")))?;
        // Keep draining stderr so the browser never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .context("connecting to the DevTools WebSocket")?;
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let pending: Pending = Arc::default();
        let problems: Arc<Mutex<Vec<String>>> = Arc::default();
        let reader = {
            let pending = pending.clone();
            let problems = problems.clone();
            tokio::spawn(async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let Message::Text(text) = msg else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    if let Some(id) = v.get("id").and_then(Value::as_u64) {
                        let tx = pending.lock().unwrap().remove(&id);
                        if let Some(tx) = tx {
                            let r = match v.get("error") {
                                Some(e) => Err(anyhow!("DevTools error: {e}")),
                                None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
                            };
                            let _ = tx.send(r);
                        }
                        continue;
                    }
                    match v["method"].as_str() {
                        Some("Runtime.exceptionThrown") => {
                            let d = &v["params"]["exceptionDetails"];
                            problems.lock().unwrap().push(format!(
                                "exception: {} {}",
                                d["text"].as_str().unwrap_or(""),
                                d["exception"]["description"].as_str().unwrap_or("")
                            ));
                        }
                        Some("Runtime.consoleAPICalled")
                            if v["params"]["type"].as_str() == Some("error") =>
                        {
                            problems
                                .lock()
                                .unwrap()
                                .push(format!("console.error: {}", v["params"]["args"]));
                        }
                        _ => {}
                    }
                }
                // The browser went away: fail whatever still waits.
                for (_, tx) in pending.lock().unwrap().drain() {
                    let _ = tx.send(Err(anyhow!("the browser connection closed")));
                }
            })
        };
        Ok(Browser {
            child,
            _profile: profile,
            out,
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            problems,
            reader,
        })
    }

    /// Sends one DevTools command (to a page when `session` is given).
    pub async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.out
            .send(Message::text(msg.to_string()))
            .map_err(|_| anyhow!("the browser connection closed"))?;
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(r)) => r.with_context(|| method.to_string()),
            Ok(Err(_)) => bail!("{method}: no answer (connection closed)"),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                bail!("{method}: no answer within {COMMAND_TIMEOUT:?}")
            }
        }
    }

    /// Opens a new page (tab) of `width`×`height` CSS pixels.
    pub async fn new_page(&self, name: &str, width: u32, height: u32) -> Result<Page<'_>> {
        let t = self
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await?;
        let target = t["targetId"].as_str().context("targetId")?.to_string();
        let a = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await?;
        let session = a["sessionId"].as_str().context("sessionId")?.to_string();
        let page = Page {
            browser: self,
            session,
            name: name.to_string(),
        };
        page.call("Page.enable", json!({})).await?;
        page.call("Runtime.enable", json!({})).await?;
        page.resize(width, height, false).await?;
        Ok(page)
    }

    /// Console errors and exceptions seen so far.
    pub fn problems(&self) -> Vec<String> {
        self.problems.lock().unwrap().clone()
    }

    /// Stops the browser.
    pub async fn close(mut self) {
        let _ = self.call(None, "Browser.close", json!({})).await;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        self.reader.abort();
    }
}

/// One page of the browser.
pub struct Page<'b> {
    browser: &'b Browser,
    session: String,
    pub name: String,
}

impl Page<'_> {
    pub async fn call(&self, method: &str, params: Value) -> Result<Value> {
        self.browser.call(Some(&self.session), method, params).await
    }

    /// Sets the viewport (`mobile`: a phone's).
    pub async fn resize(&self, width: u32, height: u32, mobile: bool) -> Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await?;
        Ok(())
    }

    /// Navigates and waits for the document to load.
    pub async fn goto(&self, url: &str) -> Result<()> {
        let r = self.call("Page.navigate", json!({"url": url})).await?;
        if let Some(e) = r.get("errorText").and_then(Value::as_str) {
            bail!("{}: navigating to {url}: {e}", self.name);
        }
        // The old document may still be there (and complete): wait for the new one.
        let prefix = url.split('#').next().unwrap_or(url);
        self.wait_for(
            "the document loaded",
            &format!(
                "location.href.startsWith({}) && document.readyState === 'complete'",
                Value::String(prefix.to_string())
            ),
        )
        .await?;
        Ok(())
    }

    /// Evaluates `expr` (awaiting a promise) and returns its JSON value.
    pub async fn eval(&self, expr: &str) -> Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!(
                "{}: {expr}: {}",
                self.name,
                e["exception"]["description"]
                    .as_str()
                    .or(e["text"].as_str())
                    .unwrap_or("exception")
            );
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Polls `expr` until it is truthy, for at most [`crate::WAIT`] (a deadline, not
    /// a sleep: the page's state is the event awaited).
    pub async fn wait_for(&self, what: &str, expr: &str) -> Result<Value> {
        let deadline = Instant::now() + crate::WAIT;
        loop {
            let last = match self.eval(expr).await {
                Ok(v) if truthy(&v) => return Ok(v),
                Ok(v) => v,
                Err(e) => json!(e.to_string()),
            };
            if Instant::now() > deadline {
                bail!(
                    "{}: waited {:?} for {what} ({expr}); last value {last}; page problems: {:?}",
                    self.name,
                    crate::WAIT,
                    self.browser.problems()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A PNG of the whole page, written to `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await?;
        let data = r["data"].as_str().context("screenshot data")?;
        let png = base64_decode(data)?;
        anyhow::ensure!(png.starts_with(b"\x89PNG"), "not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

/// Standard base64 (RFC 4648), as DevTools sends screenshots.
pub fn base64_decode(s: &str) -> Result<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let trimmed: &[u8] = {
        let mut end = bytes.len();
        while end > 0 && bytes[end - 1] == b'=' {
            end -= 1;
        }
        &bytes[..end]
    };
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &c in trimmed {
        acc = (acc << 6) | val(c).ok_or_else(|| anyhow!("invalid base64 byte {c}"))?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// Where test artefacts go: `$GS_ARTIFACTS_DIR`, else `$CARGO_TARGET_DIR/artifacts`,
/// else the workspace's `target/artifacts`.
pub fn artifacts_dir() -> PathBuf {
    if let Ok(d) = std::env::var("GS_ARTIFACTS_DIR") {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(d).join("artifacts");
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("artifacts")
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn base64_decodes_rfc4648_vectors() {
        for (enc, dec) in [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg==", "foob"),
            ("Zm9vYmE=", "fooba"),
            ("Zm9vYmFy", "foobar"),
        ] {
            assert_eq!(base64_decode(enc).unwrap(), dec.as_bytes());
        }
        assert!(base64_decode("Zm9v!").is_err());
    }
}
