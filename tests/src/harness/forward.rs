//! A TCP forwarder on a port known before its target exists: the control
//! plane needs its heartbeat proxy's address at start-up, the proxy needs
//! the control plane first.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

/// Forwards every connection to the target set with [`Forwarder::point_to`];
/// connections before that are closed at once. Stops when dropped with its
/// runtime.
pub struct Forwarder {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
}

impl Forwarder {
    /// Binds a loopback port and starts forwarding (on the current runtime).
    pub async fn start() -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let t = target.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = *t.lock();
                tokio::spawn(async move {
                    let Some(to) = to else { return };
                    if let Ok(mut out) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Forwarder { addr, target }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where connections from now on go.
    pub fn point_to(&self, to: SocketAddr) {
        *self.target.lock() = Some(to);
    }
}
