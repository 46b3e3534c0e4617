//! The OpenAPI document the API serves is the one its types generate, and it lists exactly the
//! parameters each handler accepts. `scripts/openapi.sh` writes the document anew.
#![cfg(feature = "openapi")]

use tollgate_query_api::openapi;

const SERVED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

#[test]
fn the_served_document_is_the_generated_one() {
    let generated = openapi::document();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(SERVED, &generated).unwrap();
    }
    let served = std::fs::read_to_string(SERVED).unwrap();
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
