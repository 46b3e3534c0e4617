//! Routing: method + path template to a route, with `matchit` (the radix-tree router axum uses).

use crate::config::RouteConfig;

/// Routes by path template; each template may serve several routes that differ by method.
pub struct Router {
    paths: matchit::Router<Vec<usize>>,
    routes: Vec<RouteConfig>,
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
        Ok(Router { paths, routes })
    }

    /// The route for `method` and `path`, if any, with its position in the configuration.
    pub fn find(&self, method: &str, path: &str) -> Option<(usize, &RouteConfig)> {
        let m = self.paths.at(path).ok()?;
        m.value
            .iter()
            .map(|i| (*i, &self.routes[*i]))
            .find(|(_, r)| r.methods.is_empty() || r.methods.iter().any(|x| x == method))
    }

    /// Route ids in configuration order (the positions `find` returns).
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str, methods: &[&str], path: &str) -> RouteConfig {
        RouteConfig {
            id: id.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            path: path.into(),
            upstream: "u".into(),
            strip_prefix: None,
            auth: crate::config::RouteAuth::All(true),
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
        assert_eq!(r.find("DELETE", "/lower").unwrap().1.id, "lower");
        assert_eq!(r.find("GET", "/v1/orders").unwrap().1.id, "list");
        assert_eq!(r.find("POST", "/v1/orders").unwrap().1.id, "create");
        assert_eq!(r.find("GET", "/v1/orders/42").unwrap().1.id, "get");
        assert!(r.find("DELETE", "/v1/orders/42").is_none());
        assert!(r.find("GET", "/v1/orders/42/items").is_none());
        assert_eq!(r.find("PUT", "/files/a/b/c").unwrap().1.id, "files");
        assert!(r.find("GET", "/nope").is_none());
    }

    #[test]
    fn conflicting_templates_name_the_route() {
        let err = Router::build(&[route("a", &[], "/x/{id}"), route("b", &[], "/x/{other}")])
            .err()
            .unwrap();
        assert!(err.contains("gateway.routes[1].path"), "{err}");
    }
}
