//! `weir builtin web`: the lab's stand-in for nginx/httpd images. Every path answers 200 with
//! a page naming the pod, its namespace, the address the request arrived on and the client
//! address:port it saw (so NAT is visible); HTTP/1.1 keep-alive; one log line per request on
//! stdout.
use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

/// The page for one request.
pub fn page(pod: &str, namespace: &str, local: SocketAddr, client: SocketAddr) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><title>Welcome to weir's built-in web server</title></head>\n\
         <body>\n<h1>Hello from {pod}</h1>\n<p>pod: {pod}</p>\n<p>namespace: {namespace}</p>\n\
         <p>server address: {local}</p>\n<p>client address: {client}</p>\n</body></html>\n"
    )
}

/// Serves on every port until killed.
pub async fn serve(ports: &[u16], pod: String, namespace: String) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for port in ports {
        // `[::]` takes both families (IPv4 clients appear as IPv4-mapped addresses, shown in
        // their IPv4 form); `0.0.0.0` where the pod has no IPv6.
        let listener = match tokio::net::TcpListener::bind(("::", *port)).await {
            Ok(listener) => listener,
            Err(_) => tokio::net::TcpListener::bind(("0.0.0.0", *port))
                .await
                .map_err(|e| anyhow::anyhow!("binding port {port}: {e}"))?,
        };
        let bound = listener.local_addr()?;
        println!("weir builtin web: listening on {bound}");
        let (pod, namespace) = (pod.clone(), namespace.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, client)) = listener.accept().await else { continue };
                let canonical = |a: std::net::SocketAddr| {
                    std::net::SocketAddr::new(a.ip().to_canonical(), a.port())
                };
                let client = canonical(client);
                let local = stream.local_addr().map(canonical).unwrap_or(client);
                let (pod, namespace) = (pod.clone(), namespace.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let body = page(&pod, &namespace, local, client);
                        println!(
                            "{client} - - [{}] \"{} {} {:?}\" 200 {}",
                            k8s_openapi::jiff::Timestamp::now(),
                            req.method(),
                            req.uri(),
                            req.version(),
                            body.len()
                        );
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("content-type", "text/html; charset=utf-8")
                                    .header("server", "weir-builtin-web")
                                    .body(Full::new(Bytes::from(body)))
                                    .expect("static response"),
                            )
                        }
                    });
                    let _ = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }
    futures::future::join_all(tasks).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_names_pod_and_client() {
        let p = super::page(
            "web-1",
            "team",
            "10.0.0.5:80".parse().unwrap(),
            "10.0.0.9:4242".parse().unwrap(),
        );
        assert!(p.contains("pod: web-1") && p.contains("namespace: team"));
        assert!(p.contains("client address: 10.0.0.9:4242"));
    }
}
