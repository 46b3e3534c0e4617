//! Routing: host, method and path template to a route, with `matchit` (the radix-tree router
//! axum uses) for the path.

use crate::config::RouteConfig;

/// Routes by path template; each template may serve several routes that differ by method.
pub struct Router {
    paths: matchit::Router<Vec<usize>>,
    routes: Vec<RouteConfig>,
    /// Whether any route names hosts (else a request's host is not looked at).
    names_hosts: bool,
}

impl Router {
    /// Builds the router; conflicting templates are an error naming the route.
    pub fn build(routes: &[RouteConfig]) -> Result<Router, String> {
        let mut by_path: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            match by_path.iter_mut().find(|(p, _)| *p == r.path) {
                Some((_, ids)) => ids.push(i),
                None => by_path.push((r.path.clone(), vec![i])),
            }
        }
        let mut paths = matchit::Router::new();
        for (path, ids) in by_path {
            paths
                .insert(path.clone(), ids.clone())
                .map_err(|e| format!("gateway.routes[{}].path: `{path}`: {e}", ids[0]))?;
        }
        let mut routes = routes.to_vec();
        for r in &mut routes {
            r.methods
                .iter_mut()
                .for_each(|m| *m = m.to_ascii_uppercase());
        }
        let names_hosts = routes.iter().any(|r| !r.hosts.is_empty());
        Ok(Router {
            paths,
            routes,
            names_hosts,
        })
    }

    /// The route for `host` (the request's `Host`, port and all), `method` and `path`, if any,
    /// with its position in the configuration. Among the routes of the path and method, the
    /// first that names the host wins; else the first that names no host. `host` is called
    /// only when a route names hosts.
    pub fn find<'h>(
        &self,
        host: impl FnOnce() -> Option<&'h str>,
        method: &str,
        path: &str,
    ) -> Option<(usize, &RouteConfig)> {
        let m = self.paths.at(path).ok()?;
        let host = if self.names_hosts { host() } else { None };
        let candidates = m
            .value
            .iter()
            .map(|i| (*i, &self.routes[*i]))
            .filter(|(_, r)| r.methods.is_empty() || r.methods.iter().any(|x| x == method));
        let host = host.map(without_port);
        candidates
            .clone()
            .find(|(_, r)| host.is_some_and(|h| r.hosts.iter().any(|p| host_matches(p, h))))
            .or_else(|| candidates.clone().find(|(_, r)| r.hosts.is_empty()))
    }

    /// Route ids in configuration order (the positions `find` returns).
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.id.as_str())
    }
}

/// `host` without its port (`[::1]:80` keeps its brackets).
fn without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.split_once(':').map_or(host, |(name, _)| name)
}

/// Whether `host` is `pattern`, or a subdomain of it when `pattern` is `*.domain`; any case.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            host.len() > suffix.len()
                && host.as_bytes()[host.len() - suffix.len()..]
                    .eq_ignore_ascii_case(suffix.as_bytes())
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str, methods: &[&str], path: &str) -> RouteConfig {
        RouteConfig {
            id: id.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            hosts: vec![],
            path: path.into(),
            upstream: "u".into(),
            strip_prefix: None,
            auth: crate::config::RouteAuth::All(true),
            rate_limit: None,
            timeout_ms: None,
        }
    }

    #[test]
    fn matches_templates_and_methods() {
        let r = Router::build(&[
            route("list", &["GET"], "/v1/orders"),
            route("create", &["POST"], "/v1/orders"),
            route("get", &["GET"], "/v1/orders/{id}"),
            route("files", &[], "/files/{*rest}"),
            route("lower", &["delete"], "/lower"),
        ])
        .unwrap();
        let no_host = || -> Option<&str> { panic!("no route names a host: the host is not read") };
        assert_eq!(r.find(no_host, "DELETE", "/lower").unwrap().1.id, "lower");
        assert_eq!(r.find(|| None, "GET", "/v1/orders").unwrap().1.id, "list");
        assert_eq!(
            r.find(|| None, "POST", "/v1/orders").unwrap().1.id,
            "create"
        );
        assert_eq!(r.find(|| None, "GET", "/v1/orders/42").unwrap().1.id, "get");
        assert!(r.find(|| None, "DELETE", "/v1/orders/42").is_none());
        assert!(r.find(|| None, "GET", "/v1/orders/42/items").is_none());
        assert_eq!(
            r.find(|| None, "PUT", "/files/a/b/c").unwrap().1.id,
            "files"
        );
        assert!(r.find(|| None, "GET", "/nope").is_none());
    }

    #[test]
    fn a_route_naming_the_host_wins_and_hostless_routes_serve_the_rest() {
        let mut api = route("api", &[], "/v1/{*rest}");
        api.hosts = vec!["api.example.com".into()];
        let mut tenants = route("tenants", &["GET"], "/v1/{*rest}");
        tenants.hosts = vec!["*.tenants.example.com".into()];
        let r = Router::build(&[route("any", &[], "/v1/{*rest}"), api, tenants]).unwrap();
        let at = |host: Option<&str>, method: &str| {
            r.find(|| host, method, "/v1/x").map(|(_, r)| r.id.as_str())
        };
        assert_eq!(at(Some("API.example.com:8443"), "POST"), Some("api"));
        assert_eq!(at(Some("acme.tenants.example.com"), "GET"), Some("tenants"));
        assert_eq!(
            at(Some("acme.tenants.example.com"), "POST"),
            Some("any"),
            "method first"
        );
        assert_eq!(
            at(Some("tenants.example.com"), "GET"),
            Some("any"),
            "a wildcard needs a subdomain"
        );
        assert_eq!(at(Some("other.example.com"), "GET"), Some("any"));
        assert_eq!(at(None, "GET"), Some("any"));
        assert_eq!(without_port("[::1]:80"), "[::1]");
        let only = Router::build(&[{
            let mut r = route("only", &[], "/x");
            r.hosts = vec!["a.example".into()];
            r
        }])
        .unwrap();
        assert!(
            only.find(|| Some("b.example"), "GET", "/x").is_none(),
            "no hostless route: 404"
        );
    }

    #[test]
    fn conflicting_templates_name_the_route() {
        let err = Router::build(&[route("a", &[], "/x/{id}"), route("b", &[], "/x/{other}")])
            .err()
            .unwrap();
        assert!(err.contains("gateway.routes[1].path"), "{err}");
    }
}
