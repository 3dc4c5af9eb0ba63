//! A raw-TCP upstream for statuses no HTTP library sends: it answers every
//! request with a fixed status line (`HTTP/1.1 600 Weird`, `HTTP/1.1 99
//! Low`) and an OpenAI-format JSON body, keeping the connection open.
//! Blocking IO on its own threads: a handful of connections per test.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A running raw upstream. Dropping it stops accepting (open connections
/// end when their peer closes them).
#[derive(Debug)]
pub struct RawUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RawUpstream {
    /// Listens on an ephemeral local port; every request is answered with
    /// `HTTP/1.1 {status_line}` (e.g. `"600 Weird"`).
    ///
    /// # Panics
    /// When it cannot listen (a test setup failure).
    pub fn start(status_line: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("raw upstream: bind");
        let addr = listener.local_addr().expect("raw upstream: address");
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let body = r#"{"id":"chatcmpl-raw","object":"chat.completion","created":0,"model":"raw","choices":[{"index":0,"message":{"role":"assistant","content":"odd"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        let answer: Arc<[u8]> = format!(
            "HTTP/1.1 {status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nset-cookie: raw=1\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
        .into();
        let (count, stopping) = (requests.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("claw-raw-{}", addr.port()))
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let (count, answer) = (count.clone(), answer.clone());
                    let _ = std::thread::Builder::new()
                        .name("claw-raw-conn".into())
                        .spawn(move || {
                            let _ = serve(stream, &count, &answer);
                        });
                }
            })
            .expect("raw upstream: thread");
        RawUpstream {
            addr,
            requests,
            stop,
        }
    }

    /// The OpenAI base URL, `http://ip:port/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Requests received (heads read to the end of their bodies).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Answers each request on `stream` (head, then `content-length` bytes of
/// body) with `answer`, until the peer closes it.
fn serve(stream: TcpStream, count: &AtomicU64, answer: &[u8]) -> io::Result<()> {
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" && !first {
                break;
            }
            first = false;
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        count.fetch_add(1, Ordering::AcqRel);
        out.write_all(answer)?;
        out.flush()?;
    }
}
