//! What control leaves on disk: a generated admin key goes to a file only its user can read (the
//! terminal gets the path, never the key), the data folder is 0700 and the database 0600.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use kakuremichi_e2e::{bin, free_tcp_port, wait_for, Api, Proc};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn a_generated_admin_key_is_written_to_a_private_file_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_tcp_port();
    let log = dir.path().join("control.log");
    let _control = Proc::spawn(
        "control",
        &bin("kakuremichi-control").unwrap(),
        &[
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            data.display().to_string(),
        ],
        &[],
        None,
        log.clone(),
    )
    .unwrap();
    let key_file = data.join("admin-key");
    let http = kakuremichi_e2e::test_http_client();
    wait_for("control to be healthy", Duration::from_secs(20), || async {
        Ok(http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
            .map(|_| ()))
    })
    .await
    .unwrap();

    let key = std::fs::read_to_string(&key_file).unwrap();
    let key = key.trim();
    assert!(key.starts_with("kma_"), "not an admin key: {key:?}");
    assert_eq!(mode(&key_file), 0o600, "admin key file mode");
    assert_eq!(mode(&data), 0o700, "data folder mode");
    assert_eq!(mode(&data.join("control.db")), 0o600, "database mode");
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(
        output.contains(&key_file.display().to_string()),
        "the path of the key file is not printed:\n{output}"
    );
    assert!(!output.contains(key), "the admin key reached the output");
    // The key in the file works.
    let api = Api::new(&format!("http://127.0.0.1:{port}"), key);
    api.get("/api/v1/sites").await.unwrap();
}
