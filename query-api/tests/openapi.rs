//! The OpenAPI document the API serves is the one its types generate, and it lists exactly the
//! parameters each handler accepts. `scripts/openapi.sh` writes the document anew.
#![cfg(feature = "openapi")]

use tollgate_query_api::openapi;

/// The document in this checkout. The runner's CARGO_MANIFEST_DIR first: a test binary built
/// in another checkout and found fresh carries that checkout's path in `env!`.
fn served_path() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .join("openapi.json")
}

#[test]
fn the_served_document_is_the_generated_one() {
    let generated = openapi::document();
    let served_path = served_path();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&served_path, &generated).unwrap();
    }
    let served = std::fs::read_to_string(&served_path).unwrap();
    assert!(
        served == generated,
        "query-api/openapi.json is not what the API's types generate; run scripts/openapi.sh \
         to write it anew and review the diff"
    );
}

#[test]
fn every_endpoint_documents_exactly_the_parameters_its_handler_accepts() {
    let documented = openapi::documented_params();
    let accepted = openapi::accepted_params();
    assert_eq!(
        documented.len(),
        accepted.len(),
        "documented /v1 paths: {documented:?}"
    );
    for (path, names) in accepted {
        let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut got = documented
            .iter()
            .find(|(p, _)| p == path)
            .unwrap_or_else(|| panic!("{path} is not documented"))
            .1
            .clone();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{path}");
    }
}
