//! The ceiling of two proxy shapes on this machine, with nothing of Tollgate in them: a bare
//! hyper server and client (`hyper`), and a proxy on httparse offsets with one upstream
//! connection per client connection and Content-Length bodies only (`raw`). Both run a thread
//! per core with SO_REUSEPORT, as the gateway does. This measured why the gateway speaks
//! HTTP/1.1 through its own codec (BENCHMARKS.md, "The gateway on its own HTTP/1.1 codec").
//!
//! `cargo run --release -p tollgate-gateway --example proxy_ceiling -- hyper|raw LISTEN UPSTREAM`
//! then load LISTEN with wrk beside nginx as a reverse proxy to the same UPSTREAM.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn listeners(addr: SocketAddr, n: usize) -> Vec<std::net::TcpListener> {
    (0..n)
        .map(|_| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.set_reuse_port(true).unwrap();
            s.set_nonblocking(true).unwrap();
            s.bind(&addr.into()).unwrap();
            s.listen(1024).unwrap();
            s.into()
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args[1].clone();
    let listen: SocketAddr = args[2].parse().unwrap();
    let up: SocketAddr = args[3].parse().unwrap();
    let mut hs = vec![];
    for l in listeners(listen, 2) {
        let mode = mode.clone();
        hs.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = TcpListener::from_std(l).unwrap();
                if mode == "hyper" {
                    hyper_mode(l, up).await
                } else {
                    raw_mode(l, up).await
                }
            })
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
}

async fn hyper_mode(l: TcpListener, up: SocketAddr) {
    use hyper_util::client::legacy::{Client, connect::HttpConnector};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    let client: Client<HttpConnector, hyper::body::Incoming> =
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(c);
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                s.set_nodelay(true).unwrap();
                let client = client.clone();
                tokio::task::spawn_local(async move {
                    let svc = hyper::service::service_fn(
                        move |mut req: http::Request<hyper::body::Incoming>| {
                            let client = client.clone();
                            async move {
                                let uri = format!(
                                    "http://{}{}",
                                    up,
                                    req.uri()
                                        .path_and_query()
                                        .map(|p| p.as_str())
                                        .unwrap_or("/")
                                );
                                *req.uri_mut() = uri.parse().unwrap();
                                req.headers_mut().remove(http::header::HOST);
                                client.request(req).await
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        })
        .await
}

// Minimal: CL-framed requests and responses only, one upstream connection per client connection.
async fn raw_mode(l: TcpListener, up: SocketAddr) {
    loop {
        let (mut s, _) = l.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        tokio::spawn(async move {
            let mut u: Option<TcpStream> = None;
            let mut buf = bytes::BytesMut::with_capacity(8192);
            let mut ubuf = bytes::BytesMut::with_capacity(16384);
            let mut out = Vec::with_capacity(8192);
            loop {
                // read request head
                let (head_len, body_len) = loop {
                    let mut hdrs = [httparse::EMPTY_HEADER; 64];
                    let mut req = httparse::Request::new(&mut hdrs);
                    if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                        let cl = req
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                            .unwrap_or(0);
                        out.clear();
                        out.extend_from_slice(req.method.unwrap().as_bytes());
                        out.push(b' ');
                        out.extend_from_slice(req.path.unwrap().as_bytes());
                        out.extend_from_slice(b" HTTP/1.1\r\n");
                        for h in req.headers.iter() {
                            if h.name.eq_ignore_ascii_case("host")
                                || h.name.eq_ignore_ascii_case("connection")
                            {
                                continue;
                            }
                            out.extend_from_slice(h.name.as_bytes());
                            out.extend_from_slice(b": ");
                            out.extend_from_slice(h.value);
                            out.extend_from_slice(b"\r\n");
                        }
                        out.extend_from_slice(b"host: up\r\nx-forwarded-for: 127.0.0.1\r\n\r\n");
                        break (n, cl);
                    }
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                };
                let _ = buf.split_to(head_len);
                while buf.len() < body_len {
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                out.extend_from_slice(&buf.split_to(body_len));
                if u.is_none() {
                    let t = TcpStream::connect(up).await.unwrap();
                    t.set_nodelay(true).unwrap();
                    u = Some(t);
                }
                let us = u.as_mut().unwrap();
                us.write_all(&out).await.unwrap();
                // response
                let (hl, bl) = loop {
                    let mut hdrs = [httparse::EMPTY_HEADER; 64];
                    let mut resp = httparse::Response::new(&mut hdrs);
                    if let Ok(httparse::Status::Complete(n)) = resp.parse(&ubuf) {
                        let cl = resp
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                            .unwrap_or(0);
                        break (n, cl);
                    }
                    if us.read_buf(&mut ubuf).await.unwrap_or(0) == 0 {
                        return;
                    }
                };
                while ubuf.len() < hl + bl {
                    if us.read_buf(&mut ubuf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                let r = ubuf.split_to(hl + bl);
                if s.write_all(&r).await.is_err() {
                    return;
                }
            }
        });
    }
}
