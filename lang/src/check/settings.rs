//! `server`, `listener` and resource options checked against `schema`.

use super::*;

impl<'s> Checker<'s> {
    /// `backup_peer`/`backup_listen` (section 5.5): IP:port addresses, a `backup_key`, and a
    /// shared state store (the peers' heartbeats and confirmations live there); a password
    /// written in the `state` URL is better a `state_password` secret.
    fn backup_settings(&mut self, opts: &[(String, OptValue)], options: &[ast::Opt], span: Span) {
        let at = |k: &str| options.iter().find(|o| o.name.name == k).map(|o| o.value.span).unwrap_or(span);
        let state = opts.iter().find_map(|(k, v)| match v {
            OptValue::Str(u) if k == "state" => Some(u.as_str()),
            _ => None,
        });
        let mut named = None;
        for k in ["backup_peer", "backup_listen"] {
            if let Some((_, OptValue::Str(a))) = opts.iter().find(|(n, _)| n == k) {
                named.get_or_insert(k);
                if a.parse::<std::net::SocketAddr>().is_err() {
                    self.err(
                        Diagnostic::error("mailc::setting", format!("\"{a}\" is not an IP:port address"))
                            .at(at(k))
                            .help("write the peer's backup listener as \"10.0.0.2:2526\" or \"[2001:db8::2]:2526\""),
                    );
                }
            }
        }
        if let Some(k) = named {
            if !opts.iter().any(|(n, _)| n == "backup_key") {
                self.err(
                    Diagnostic::error("mailc::setting", format!("`{k}` needs a `backup_key`"))
                        .at(at(k))
                        .help("declare `secret backup = file \"backup.key\";` (the same key on every host) and write `backup_key backup;`"),
                );
            }
            if state.is_none_or(|u| u == "local") {
                self.err(
                    Diagnostic::error("mailc::setting", format!("`{k}` needs a shared state store"))
                        .at(at(k))
                        .help("the hosts see each other's heartbeats and confirmations in Redis: add `state \"redis://HOST:6379/0\";`"),
                );
            }
        }
        // `backup_tls`: a listener needs a certificate (its own pair or the self-signed
        // one), a sender a way to verify its peer; TLS files without `backup_tls` do nothing.
        let on = |k: &str| opts.iter().any(|(n, v)| n == k && !matches!(v, OptValue::Bool(false)));
        let tls = on("backup_tls");
        for k in ["backup_tls_cert", "backup_tls_key", "backup_tls_ca", "backup_tls_name"] {
            if on(k) && !tls {
                self.err(
                    Diagnostic::warning("mailc::setting", format!("`{k}` has no effect without `backup_tls true`"))
                        .at(at(k))
                        .help("add `backup_tls true;` on both hosts of the pair, or remove it"),
                );
            }
        }
        if tls {
            if named.is_none() {
                self.err(
                    Diagnostic::warning("mailc::setting", "`backup_tls` without `backup_peer` or `backup_listen`")
                        .at(at("backup_tls"))
                        .help("it protects the backup channel of section 5.5: name the peer and the listener too"),
                );
            }
            if on("backup_tls_cert") != on("backup_tls_key") {
                let k = if on("backup_tls_cert") { "backup_tls_cert" } else { "backup_tls_key" };
                self.err(
                    Diagnostic::error("mailc::setting", "`backup_tls_cert` and `backup_tls_key` go together")
                        .at(at(k))
                        .help("name both files, or neither (the self-signed pair is then served)"),
                );
            }
            if on("backup_peer") && !on("backup_tls_ca") {
                self.err(
                    Diagnostic::error("mailc::setting", "`backup_tls` sends copies to a peer it cannot verify")
                        .at(at("backup_tls"))
                        .help("add `backup_tls_ca \"peer-ca.pem\";`: the CAs the peer's certificate chains to, or its own self-signed certificate"),
                );
            }
            if let Some((_, OptValue::Str(n))) = opts.iter().find(|(n, _)| n == "backup_tls_name") {
                let ok = n.parse::<std::net::IpAddr>().is_ok()
                    || (!n.is_empty()
                        && n.len() <= 253
                        && n.split('.').all(|l| {
                            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        }));
                if !ok {
                    self.err(
                        Diagnostic::error("mailc::setting", format!("\"{n}\" is not a DNS name or an IP address"))
                            .at(at("backup_tls_name"))
                            .help("write the name the peer's certificate is for, e.g. \"mx-b.example.com\""),
                    );
                }
            }
        }
        if let Some(u) = state {
            let pass = u.split_once("://").and_then(|(_, rest)| rest.split(['/', '?']).next()).and_then(|auth| {
                auth.rsplit_once('@').and_then(|(cred, _)| cred.split_once(':')).filter(|(_, p)| !p.is_empty())
            });
            if pass.is_some() {
                self.err(
                    Diagnostic::warning("mailc::setting", "the state store's password is written in the policy")
                        .at(at("state"))
                        .help("keep it out of the policy text: `secret redis = file \"redis.pass\";` and `state_password redis;`"),
                );
            }
        }
    }

    pub(super) fn settings(
        &mut self,
        kw: ast::SettingsKw,
        name: Option<&ast::Ident>,
        options: &[ast::Opt],
        span: Span,
        saw_server: &mut bool,
    ) {
        match kw {
            ast::SettingsKw::Server => {
                if let Some(n) = name {
                    self.err(
                        Diagnostic::error("mailc::syntax", "`server` takes no name")
                            .at(n.span)
                            .help("write `server { ... }`"),
                    );
                }
                if *saw_server {
                    self.err(
                        Diagnostic::error("mailc::duplicate", "a second `server` block")
                            .at(span)
                            .help("put all server settings in one block"),
                    );
                }
                *saw_server = true;
                let opts = self.options(schema::SERVER, options, "`server`");
                if let Some((_, OptValue::Str(url))) = opts.iter().find(|(k, _)| k == "state") {
                    let ok = url == "local"
                        || ["redis://", "redis+unix://", "unix://"]
                            .iter()
                            .any(|p| url.len() > p.len() && url.to_ascii_lowercase().starts_with(p));
                    if !ok {
                        let at = options.iter().find(|o| o.name.name == "state").map(|o| o.value.span).unwrap_or(span);
                        self.err(
                            Diagnostic::error("mailc::setting", format!("\"{url}\" is not a state store")).at(at).help(
                                "write \"local\" (the default) or a Redis URL such as \"redis://127.0.0.1:6379/0\"",
                            ),
                        );
                    }
                }
                self.backup_settings(&opts, options, span);
                if let Some((_, OptValue::Str(h))) = opts.iter().find(|(k, _)| k == "fallback_relay") {
                    let at =
                        options.iter().find(|o| o.name.name == "fallback_relay").map(|o| o.value.span).unwrap_or(span);
                    super::actions::check_host(self, h, at, TransportKind::Smtp);
                }
                if opts.iter().any(|(k, v)| k == "admin_lists" && *v == OptValue::Bool(true))
                    && !opts.iter().any(|(k, _)| k == "admin")
                {
                    let at = options.iter().find(|o| o.name.name == "admin_lists").map(|o| o.name.span).unwrap_or(span);
                    self.err(
                        Diagnostic::warning("mailc::setting", "`admin_lists` without an admin listener serves nothing")
                            .at(at)
                            .help("add `admin \"127.0.0.1:9025\";`, or serve the lists on a `protocol http` listener"),
                    );
                }
                self.milter_names("non_smtpd_milters", &opts, options, span);
                let mut server = crate::settings::Server::default();
                for (k, v) in &opts {
                    server.set(k, v);
                }
                self.prog.server = server;
            }
            ast::SettingsKw::Listener => {
                let Some(n) = name else {
                    self.err(
                        Diagnostic::error("mailc::syntax", "a listener needs a name")
                            .at(span)
                            .help("write `listener mx { address \"0.0.0.0:25\"; }`"),
                    );
                    return;
                };
                if self.prog.listeners.iter().any(|l| l.name == n.name) {
                    self.err(
                        Diagnostic::error("mailc::duplicate", format!("listener `{}` is declared twice", n.name))
                            .at(n.span),
                    );
                }
                let opts = self.options(schema::LISTENER, options, "a listener");
                match opts.iter().find(|(k, _)| k == "address") {
                    None => self.err(
                        Diagnostic::error("mailc::setting", format!("listener `{}` has no address", n.name))
                            .at(n.span)
                            .help("add `address \"0.0.0.0:25\";`"),
                    ),
                    Some((_, OptValue::Str(a))) if a.parse::<std::net::SocketAddr>().is_err() => {
                        let at =
                            options.iter().find(|o| o.name.name == "address").map(|o| o.value.span).unwrap_or(n.span);
                        self.err(
                            Diagnostic::error("mailc::setting", format!("\"{a}\" is not an IP:port address"))
                                .at(at)
                                .help("write \"0.0.0.0:25\", \"127.0.0.1:2525\" or \"[::]:587\""),
                        );
                    }
                    _ => {}
                }
                if let Some((_, OptValue::List(nets))) = opts.iter().find(|(k, _)| k == "proxy_protocol") {
                    let at = options
                        .iter()
                        .find(|o| o.name.name == "proxy_protocol")
                        .map(|o| o.value.span)
                        .unwrap_or(n.span);
                    if nets.is_empty() {
                        self.err(
                            Diagnostic::error("mailc::setting", "`proxy_protocol` names no load balancer")
                                .at(at)
                                .help("list the networks of the load balancers, e.g. `proxy_protocol [\"10.0.0.5\", \"192.0.2.0/28\"];`"),
                        );
                    }
                    for net in nets.iter().filter(|s| Cidr::parse(s).is_none()) {
                        self.err(
                            Diagnostic::error("mailc::setting", format!("\"{net}\" is not an address or network"))
                                .at(at)
                                .help(
                                    "write an address (\"10.0.0.5\") or a network (\"10.0.0.0/8\", \"2001:db8::/32\")",
                                ),
                        );
                    }
                }
                self.milter_names("milters", &opts, options, n.span);
                if let Some((_, OptValue::Str(a))) = opts.iter().find(|(k, _)| k == "proxy_filter") {
                    let path = a.strip_prefix("unix:");
                    let ok = match path {
                        Some(p) => p.starts_with('/'),
                        None => a.parse::<std::net::SocketAddr>().is_ok(),
                    };
                    if !ok {
                        let at = options
                            .iter()
                            .find(|o| o.name.name == "proxy_filter")
                            .map(|o| o.value.span)
                            .unwrap_or(n.span);
                        self.err(
                            Diagnostic::error("mailc::setting", format!("\"{a}\" is not a proxy filter address"))
                                .at(at)
                                .help("write \"127.0.0.1:10025\", \"[::1]:10025\" or \"unix:/run/filter.sock\""),
                        );
                    }
                }
                let has = |k: &str| opts.iter().any(|(n, _)| n == k);
                if has("cert") != has("key") {
                    self.err(
                        Diagnostic::error("mailc::setting", format!("listener `{}` sets only one of `cert` and `key`", n.name))
                            .at(n.span)
                            .help("give both the certificate chain and its private key, or neither (a self-signed pair is made)"),
                    );
                }
                // AUTH needs logins to check: `auth` other than `none` (submission and
                // submissions default to `required`) without `credentials` would refuse
                // every MAIL with 530.
                let word = |k: &str| match opts.iter().find(|(n, _)| n == k) {
                    Some((_, OptValue::Word(w))) => Some(w.clone()),
                    _ => None,
                };
                let protocol = word("protocol").unwrap_or_else(|| "smtp".into());
                let default_auth = if protocol == "smtp" || protocol == "http" { "none" } else { "required" };
                let auth = word("auth").unwrap_or_else(|| default_auth.into());
                if auth != "none" && !has("credentials") {
                    self.err(
                        Diagnostic::error("mailc::setting", format!("listener `{}` offers AUTH but has no `credentials`", n.name))
                            .at(n.span)
                            .help(if word("auth").is_some() {
                                "add `credentials TABLE;` (a map of login -> `mailc hash-password` verifier), or say `auth none;`".to_string()
                            } else {
                                format!("a {protocol} listener requires AUTH by default: add `credentials TABLE;`, or say `auth none;`")
                            }),
                    );
                }
                let mut listener = crate::settings::Listener { name: n.name.clone(), ..Default::default() };
                for (k, v) in &opts {
                    listener.set(k, v);
                }
                self.prog.listeners.push(listener);
            }
        }
    }

    /// `milters` / `non_smtpd_milters`: every name is a milter the policy declares.
    fn milter_names(&mut self, key: &str, opts: &[(String, OptValue)], options: &[ast::Opt], span: Span) {
        let Some((_, OptValue::List(names))) = opts.iter().find(|(k, _)| k == key) else { return };
        let at = options.iter().find(|o| o.name.name == key).map(|o| o.value.span).unwrap_or(span);
        for name in names {
            match self.syms.get_mut(name.as_str()) {
                Some(sym) if sym.kind == SymKind::Scanner && sym.detail == "milter" => sym.used = true,
                _ => {
                    let milters: Vec<String> = self
                        .syms
                        .iter()
                        .filter(|(_, s)| s.kind == SymKind::Scanner && s.detail == "milter")
                        .map(|(n, _)| n.clone())
                        .collect();
                    let mut d = Diagnostic::error("mailc::undefined", format!("there is no milter `{name}`")).at(at);
                    d = match did_you_mean(name, milters.iter().map(String::as_str)) {
                        Some(s) => d.help(format!("did you mean `{s}`?")),
                        None => d.help(format!("`{key}` lists milters declared as `scanner NAME = milter \"...\";`")),
                    };
                    self.err(d);
                }
            }
        }
    }

    pub(super) fn options(&mut self, specs: &[OptSpec], options: &[ast::Opt], what: &str) -> Vec<(String, OptValue)> {
        let mut out: Vec<(String, OptValue)> = Vec::new();
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for opt in options {
            let Some(spec) = specs.iter().find(|s| s.name == opt.name.name) else {
                let mut d = Diagnostic::error("mailc::setting", format!("{what} has no setting `{}`", opt.name.name))
                    .at(opt.name.span);
                d = match did_you_mean(&opt.name.name, specs.iter().map(|s| s.name)) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None if specs.is_empty() => d.help(format!("{what} takes no settings")),
                    None => d.help(format!(
                        "the settings are {}",
                        specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                    )),
                };
                self.err(d);
                continue;
            };
            if let Some(prev) = seen.insert(spec.name, opt.name.span) {
                self.err(
                    Diagnostic::error("mailc::duplicate", format!("`{}` is set twice", spec.name))
                        .at(opt.name.span)
                        .related(prev, "first set here"),
                );
                continue;
            }
            if let Some(v) = self.opt_value(spec, &opt.value) {
                out.push((spec.name.to_string(), v));
            }
        }
        out
    }

    pub(super) fn opt_value(&mut self, spec: &OptSpec, v: &Value) -> Option<OptValue> {
        let bad = |this: &mut Self, want: &str| {
            this.err(
                Diagnostic::error("mailc::type", format!("`{}` takes {want}", spec.name))
                    .at(v.span)
                    .label(format!("found {}", describe_value(v)))
                    .help(spec.describe()),
            );
            None
        };
        match (spec.ty, &v.kind) {
            (OptTy::Str, ValueKind::Str(s)) => Some(OptValue::Str(unescape_plain(&s.raw))),
            (OptTy::Str, _) => bad(self, "a string"),
            (OptTy::Num, ValueKind::Num(n)) => Some(OptValue::Num(*n)),
            (OptTy::Num, _) => bad(self, "a number"),
            (OptTy::Size, ValueKind::Size(n)) => Some(OptValue::Size(*n)),
            (OptTy::Size, ValueKind::Num(n)) => Some(OptValue::Size(*n as u64)),
            (OptTy::Size, ValueKind::Duration(_)) => {
                self.err(
                    Diagnostic::error("mailc::type", format!("`{}` takes a size, not a duration", spec.name))
                        .at(v.span)
                        .help("sizes use upper-case K, M and G (`10M`); lower-case `m` means minutes"),
                );
                None
            }
            (OptTy::Size, _) => bad(self, "a size such as 10M"),
            (OptTy::Duration, ValueKind::Duration(n)) => Some(OptValue::Duration(*n)),
            (OptTy::Duration, ValueKind::Size(_)) => {
                self.err(
                    Diagnostic::error("mailc::type", format!("`{}` takes a duration, not a size", spec.name))
                        .at(v.span)
                        .help("durations use ms, s, m, h, d and w (`5m`); upper-case M means megabytes"),
                );
                None
            }
            (OptTy::Duration, _) => bad(self, "a duration such as 30s or 5m"),
            (OptTy::Bool, ValueKind::Path(p)) if p == "true" || p == "false" => Some(OptValue::Bool(p == "true")),
            (OptTy::Bool, _) => bad(self, "`true` or `false`"),
            (OptTy::Word(words), ValueKind::Path(p)) if words.contains(&p.as_str()) => Some(OptValue::Word(p.clone())),
            (OptTy::Word(words), _) => bad(self, &format!("one of {}", words.join(", "))),
            (OptTy::Strings, ValueKind::List(items)) => Some(OptValue::List(
                items
                    .iter()
                    .filter_map(|i| if let ValueKind::Str(s) = &i.kind { Some(unescape_plain(&s.raw)) } else { None })
                    .collect(),
            )),
            (OptTy::Strings, _) => bad(self, "a list of strings"),
            (OptTy::Secret | OptTy::Table | OptTy::List, ValueKind::Path(p)) => {
                let want = match spec.ty {
                    OptTy::Secret => "secret",
                    OptTy::Table => "table",
                    _ => "list",
                };
                match self.syms.get_mut(p) {
                    Some(sym) if sym.kind.noun() == want => {
                        sym.used = true;
                        let id = sym.id;
                        Some(match spec.ty {
                            OptTy::Secret => OptValue::Secret(SecretId(id)),
                            OptTy::Table => OptValue::Table(TableId(id)),
                            _ => OptValue::ListRef(ListId(id)),
                        })
                    }
                    Some(sym) => {
                        let noun = sym.kind.noun();
                        self.err(
                            Diagnostic::error(
                                "mailc::type",
                                format!("`{p}` is a {noun}, but `{}` takes a {want}", spec.name),
                            )
                            .at(v.span),
                        );
                        None
                    }
                    None => {
                        self.undefined(p, v.span, Some(want));
                        None
                    }
                }
            }
            (OptTy::Secret, _) => bad(self, "the name of a secret"),
            (OptTy::Table, _) => bad(self, "the name of a table"),
            (OptTy::List, _) => bad(self, "the name of a list"),
        }
    }
}
