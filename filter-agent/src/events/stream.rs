//! Log records for `filter-agent logs`: each record as a JSON object (the
//! LOG line's fields, plus time, stage, direction, verdict, tier, policy,
//! rule and the line itself), kept for the last [`RECENT`] records and
//! streamed to whoever follows, over a Unix socket in the agent's state
//! directory (root's alone: it says who talks to the node).

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde_json::{json, Map, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    sync::{broadcast, watch},
};

/// Records kept for a client that connects later.
pub const RECENT: usize = 1000;

/// The socket's name in the state directory.
pub const SOCKET: &str = "logs.sock";

/// The records the reader publishes.
#[derive(Debug)]
pub struct Hub {
    tx: broadcast::Sender<Arc<String>>,
    recent: Mutex<VecDeque<Arc<String>>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            tx: broadcast::channel(RECENT).0,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        }
    }
}

impl Hub {
    /// Publishes one record (a JSON object, one line).
    pub fn publish(&self, record: &Value) {
        let text = Arc::new(record.to_string());
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(text.clone());
        // No follower: nothing to do.
        let _ = self.tx.send(text);
    }
}

/// The JSON object of one record: `fields` of its LOG line, and the rest.
pub fn record(line: &str, extra: Map<String, Value>) -> Value {
    let mut out = extra;
    out.insert("line".into(), json!(line));
    let mut flags = Vec::new();
    // The bracketed packet of an ICMP error stays one field.
    let (outer, inner) = match (line.find('['), line.rfind(']')) {
        (Some(a), Some(b)) if a < b => (
            format!("{}{}", &line[..a], &line[b + 1..]),
            Some(&line[a + 1..b]),
        ),
        _ => (line.to_owned(), None),
    };
    // Past the prefix: the first `IN=`.
    let body = outer.find("IN=").map_or(outer.as_str(), |i| &outer[i..]);
    for token in body.split_whitespace() {
        match token.split_once('=') {
            Some((k, v)) => {
                out.entry(k.to_owned()).or_insert_with(|| json!(v));
            }
            None => flags.push(json!(token)),
        }
    }
    out.insert("FLAGS".into(), Value::Array(flags));
    if let Some(inner) = inner {
        out.insert("INNER".into(), json!(inner.trim()));
    }
    Value::Object(out)
}

/// Serves [`SOCKET`] in `state_dir` until `stop`: each client writes one
/// line (`follow` or `recent`) and gets the recent records, one JSON
/// object per line, then (following) every new one.
pub async fn serve(
    state_dir: PathBuf,
    hub: Arc<Hub>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    crate::private::ensure_dir(&state_dir).map_err(std::io::Error::other)?;
    let path = state_dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let hub = hub.clone();
                tokio::spawn(async move {
                    let _ = client(stream, hub).await;
                });
            }
            r = stop.changed() => if r.is_err() || *stop.borrow() {
                let _ = std::fs::remove_file(&path);
                return Ok(());
            },
        }
    }
}

async fn client(stream: tokio::net::UnixStream, hub: Arc<Hub>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut request = String::new();
    BufReader::new(read).read_line(&mut request).await?;
    let follow = request.trim() == "follow";
    // Subscribe before copying the recent ones: nothing falls between.
    let mut rx = hub.tx.subscribe();
    let recent: Vec<Arc<String>> = hub
        .recent
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    for r in recent {
        write.write_all(r.as_bytes()).await?;
        write.write_all(b"\n").await?;
    }
    if !follow {
        return Ok(());
    }
    loop {
        match rx.recv().await {
            Ok(r) => {
                write.write_all(r.as_bytes()).await?;
                write.write_all(b"\n").await?;
            }
            // A slow client misses records rather than slowing the agent.
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let note = json!({"missed": n}).to_string();
                write.write_all(note.as_bytes()).await?;
                write.write_all(b"\n").await?;
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// The socket of the agent whose state directory is `state_dir`.
pub fn socket(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_becomes_its_fields() {
        let line = "calico-packet: IN=eth1 OUT= MAC=02:00 SRC=192.0.2.16 DST=192.0.2.1 LEN=56 TOS=0x00 PREC=0x00 TTL=64 ID=2 \
                    PROTO=ICMP TYPE=3 CODE=3 [SRC=192.0.2.1 DST=192.0.2.16 LEN=33 PROTO=UDP SPT=40000 DPT=53 LEN=13 ] ";
        let r = record(line, Map::new());
        assert_eq!(r["SRC"], "192.0.2.16");
        assert_eq!(r["OUT"], "");
        assert_eq!(r["TYPE"], "3");
        assert_eq!(r["LEN"], "56", "the outer packet's length, not the inner's");
        assert!(r["INNER"]
            .as_str()
            .expect("inner")
            .starts_with("SRC=192.0.2.1 "));
        assert_eq!(r["line"], line);
        let syn = record(
            "p: IN=eth1 OUT= SRC=a DST=b DF PROTO=TCP SYN URGP=0",
            Map::new(),
        );
        assert_eq!(syn["FLAGS"], json!(["DF", "SYN"]));
    }
}
