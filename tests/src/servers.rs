//! Test servers on loopback, plain or over TLS with a test CA: what the
//! network tests reach through wardend's proxy (a git server, a Python
//! package index, an npm registry, a web page) under the names the test
//! daemons map to loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::TokioIo;

/// A certificate authority for tests, and leaf certificates it signs.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "warden test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA certificate, PEM: what a client must trust.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A TLS server configuration for `names`, signed by this CA.
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().expect("server key");
        let params = rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>())
            .expect("server params");
        let cert = params.signed_by(&key, &self.issuer).expect("server certificate");
        let chain = vec![cert.der().clone(), self.issuer.der().clone()];
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        Arc::new(config)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// A router served on 127.0.0.1 (a free port) on a thread of its own,
/// plain or over TLS; stops when dropped.
#[derive(Debug)]
pub struct Served {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    pub fn start(app: Router, tls: Option<Arc<rustls::ServerConfig>>) -> Served {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let Some(tls) = tls else {
                    // Streamed answers go out as they come, as a real API's do.
                    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await;
                    return;
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                loop {
                    let (tcp, _) = tokio::select! {
                        _ = &mut stopped => return,
                        a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    };
                    let (acceptor, app) = (acceptor.clone(), app.clone());
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(async move {
                        let Ok(stream) = acceptor.accept(tcp).await else { return };
                        let svc = hyper_util::service::TowerToHyperService::new(app);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        Served {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the package-manager servers hold.
#[derive(Debug)]
struct Fixtures {
    /// A bare git repository (dumb HTTP protocol: plain files).
    git: PathBuf,
    wheel_name: String,
    wheel: Vec<u8>,
}

/// One router for every test name: `/repo.git/...` (git), `/simple/...`
/// and `/files/...` (a Python package index), `/wardenpkg` (an npm
/// registry), `/hello`, and `/headers` (what the request came with).
pub fn package_servers(dir: &Path) -> Router {
    let fixtures = Arc::new(fixtures(dir));
    Router::new()
        .route("/hello", get(|| async { "hello through the proxy\n" }))
        .route("/headers", get(echo_headers))
        .route("/repo.git/{*path}", get(git_file))
        .route("/simple/wardenpkg/", get(simple_index))
        .route("/files/{name}", get(wheel))
        .route("/wardenpkg", get(packument))
        .with_state(fixtures)
}

/// The request's headers, one `name: value` per line.
async fn echo_headers(headers: axum::http::HeaderMap) -> String {
    headers
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
        .collect()
}

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "warden")
        .env("GIT_AUTHOR_EMAIL", "warden@test")
        .env("GIT_COMMITTER_NAME", "warden")
        .env("GIT_COMMITTER_EMAIL", "warden@test")
        .output()
        .expect("run a fixture command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fixtures(dir: &Path) -> Fixtures {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("README"), "cloned through wardend's proxy\n").unwrap();
    run(&src, &["git", "init", "-q", "-b", "main"]);
    run(&src, &["git", "add", "README"]);
    run(&src, &["git", "commit", "-q", "-m", "first"]);
    run(dir, &["git", "clone", "-q", "--bare", "src", "repo.git"]);
    run(&dir.join("repo.git"), &["git", "update-server-info"]);
    // A minimal pure-Python wheel.
    let wheel_name = "wardenpkg-1.0-py3-none-any.whl".to_string();
    run(
        dir,
        &[
            "python3",
            "-c",
            "import zipfile\n\
             z = zipfile.ZipFile('wardenpkg-1.0-py3-none-any.whl', 'w')\n\
             z.writestr('wardenpkg/__init__.py', 'VERSION = \"1.0\"\\n')\n\
             z.writestr('wardenpkg-1.0.dist-info/METADATA', 'Metadata-Version: 2.1\\nName: wardenpkg\\nVersion: 1.0\\n')\n\
             z.writestr('wardenpkg-1.0.dist-info/WHEEL', 'Wheel-Version: 1.0\\nGenerator: warden\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n')\n\
             z.writestr('wardenpkg-1.0.dist-info/RECORD', '')\n\
             z.close()\n",
        ],
    );
    Fixtures {
        git: dir.join("repo.git"),
        wheel: std::fs::read(dir.join(&wheel_name)).unwrap(),
        wheel_name,
    }
}

async fn git_file(State(f): State<Arc<Fixtures>>, UrlPath(path): UrlPath<String>) -> Response {
    if path.split('/').any(|c| c == ".." || c.is_empty()) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    match tokio::fs::read(f.git.join(&path)).await {
        Ok(bytes) => bytes.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn simple_index(State(f): State<Arc<Fixtures>>) -> Response {
    let html = format!(
        "<!DOCTYPE html><html><body><a href=\"/files/{n}\">{n}</a></body></html>\n",
        n = f.wheel_name
    );
    ([(header::CONTENT_TYPE, "text/html")], html).into_response()
}

async fn wheel(State(f): State<Arc<Fixtures>>, UrlPath(name): UrlPath<String>) -> Response {
    if name != f.wheel_name {
        return StatusCode::NOT_FOUND.into_response();
    }
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from(f.wheel.clone()))
        .unwrap_or_default()
}

async fn packument() -> Response {
    let json = serde_json::json!({
        "name": "wardenpkg",
        "dist-tags": {"latest": "1.0.0"},
        "versions": {"1.0.0": {
            "name": "wardenpkg",
            "version": "1.0.0",
            "description": "served through wardend's proxy",
            "dist": {"tarball": "https://npm.test/wardenpkg/-/wardenpkg-1.0.0.tgz", "shasum": "0000000000000000000000000000000000000000"}
        }},
        "time": {"1.0.0": "2026-11-25T00:00:00.000Z"}
    });
    ([(header::CONTENT_TYPE, "application/json")], json.to_string()).into_response()
}

/// A shell script that runs curl, git clone, pip download and npm view
/// against the TLS server of [`package_servers`] on `tls_port`, trusting the
/// test CA at `/workspace/default/ca.pem`: one line of proof each.
pub fn package_script(tls_port: u16) -> String {
    let ca = "/workspace/default/ca.pem";
    format!(
        "set -u; cd /tmp; \
         echo curl: $(curl -sS --cacert {ca} https://web.test:{tls_port}/hello 2>&1); \
         git -c http.sslCAInfo={ca} clone -q https://git.test:{tls_port}/repo.git r 2>&1 && echo git: $(cat r/README); \
         python3 -m pip download -q --no-deps --no-cache-dir --disable-pip-version-check --cert {ca} \
           --index-url https://pypi.test:{tls_port}/simple/ -d dl wardenpkg==1.0 2>&1 && echo pip: $(ls dl); \
         echo npm: $(npm view wardenpkg version --registry https://npm.test:{tls_port}/ --cafile {ca} \
           --no-update-notifier --cache /tmp/npm-cache 2>&1)"
    )
}

/// What [`package_script`] prints when every tool got through.
pub fn assert_packages_arrived(out: &str) {
    for line in [
        "curl: hello through the proxy",
        "git: cloned through wardend's proxy",
        "pip: wardenpkg-1.0-py3-none-any.whl",
        "npm: 1.0.0",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }
}
