//! Binding the servers' TCP listeners with an accept queue as deep as the
//! kernel allows.
//!
//! The standard library listens with a backlog of 128. A burst of more
//! connections than that, faster than the accept loop, overflowed the
//! accept queue: the kernel dropped SYNs and each client waited for a SYN
//! retransmission (1 s, then 3 s, 7 s…) to connect. A burst of 6,000 took
//! 30–40 s to open instead of under one, so its first connections — silent
//! ones — reached the 10 s header timeout while it was still opening, which
//! looked like the connection cap closing more than the excess.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;

/// The listen backlog asked for; the kernel caps it at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
pub const ACCEPT_BACKLOG: u32 = 65_535;

/// Binds a listener on `addr` with an accept queue of [`ACCEPT_BACKLOG`],
/// so that a burst arriving right after the `listening` line waits in the
/// kernel too.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As the standard library does: a restarted server rebinds at once.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Deepens `listener`'s accept queue to [`ACCEPT_BACKLOG`] (`listen` again
/// on a listening socket only updates its backlog): for listeners bound
/// elsewhere. `name` labels the warning when the kernel refuses.
pub fn deepen_backlog(listener: &TcpListener, name: &str) {
    if let Err(e) = socket2::SockRef::from(listener).listen(ACCEPT_BACKLOG as i32) {
        tracing::warn!(listener = name, error = %e, "cannot deepen the accept queue");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bound_listener_accepts() {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let l = bind(any).expect("bound");
        let addr = l.local_addr().expect("an address");
        deepen_backlog(&l, "test");
        let (c, a) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        c.expect("connected");
        a.expect("accepted");
    }
}
