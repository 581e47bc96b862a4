//! A parser of the Prometheus text format, and the readings the tests take of it.

use std::collections::BTreeMap;

use crate::support::ss::SeriesKey;

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    /// `# TYPE` of each family.
    pub types: BTreeMap<String, String>,
}

impl Metrics {
    /// Parses the text exposition format 0.0.4 (comments skipped).
    #[track_caller]
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(t) = line.strip_prefix("# TYPE ") {
                if let Some((name, kind)) = t.split_once(' ') {
                    types.insert(name.to_string(), kind.trim().to_string());
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(
                parse_sample(line).unwrap_or_else(|e| panic!("bad metrics line {line:?}: {e}")),
            );
        }
        Metrics { samples, types }
    }

    fn matching<'s>(
        &'s self,
        name: &'s str,
        filters: &'s [(&'s str, &'s str)],
    ) -> impl Iterator<Item = &'s (String, BTreeMap<String, String>, f64)> + 's {
        self.samples.iter().filter(move |(n, labels, _)| {
            n == name
                && filters
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one series of `name` whose labels include `filters`; `None` when
    /// there is none, a panic when several match.
    #[track_caller]
    pub fn get(&self, name: &str, filters: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<_> = self.matching(name, filters).collect();
        match found.len() {
            0 => None,
            1 => Some(found[0].2),
            _ => panic!("{name}{filters:?} is ambiguous: {found:?}"),
        }
    }

    /// Sum over every series of `name` whose labels include `filters`.
    pub fn sum(&self, name: &str, filters: &[(&str, &str)]) -> f64 {
        self.matching(name, filters).map(|s| s.2).sum()
    }

    /// Every sample: (name, labels, value).
    pub fn all(&self) -> impl Iterator<Item = (&str, &BTreeMap<String, String>, f64)> {
        self.samples.iter().map(|(n, l, v)| (n.as_str(), l, *v))
    }

    pub fn series(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.matching(name, &[])
            .map(|(_, l, v)| (l.clone(), *v))
            .collect()
    }

    /// A per-socket gauge (`timewait_sockets`, `timewait_fin_wait2_orphans`)
    /// as `(direction, remote, port) -> count`, zero-valued series dropped.
    #[track_caller]
    pub fn series_map(&self, name: &str) -> BTreeMap<SeriesKey, u64> {
        let mut out = BTreeMap::new();
        for (labels, v) in self.series(name) {
            let n = as_count(name, &labels, v);
            if n == 0 {
                continue;
            }
            let get = |k: &str| {
                labels
                    .get(k)
                    .unwrap_or_else(|| panic!("{name} series {labels:?} has no {k} label"))
                    .clone()
            };
            // port="other" (ports folded beyond --top-ports) reads as 0.
            let port: u16 = match get("port").as_str() {
                "other" => 0,
                p => p.parse().unwrap_or_else(|e| panic!("{name} {labels:?}: port: {e}")),
            };
            let key = (get("direction"), get("remote"), port);
            if out.insert(key.clone(), n).is_some() {
                panic!("{name}: two series for {key:?}");
            }
        }
        out
    }

    /// `timewait_sockets` grouped by remote (zero series dropped).
    #[track_caller]
    pub fn tw_by_remote(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for ((_, remote, _), n) in self.series_map("timewait_sockets") {
            *out.entry(remote).or_insert(0) += n;
        }
        out
    }

    /// Sum of a gauge/counter as an exact count.
    #[track_caller]
    pub fn count(&self, name: &str, filters: &[(&str, &str)]) -> u64 {
        let v = self.sum(name, filters);
        as_count(name, &BTreeMap::new(), v)
    }
}

#[track_caller]
fn as_count(name: &str, labels: &BTreeMap<String, String>, v: f64) -> u64 {
    if !(v >= 0.0 && v.fract() == 0.0 && v < 1e15) {
        panic!("{name}{labels:?} = {v} is not a non-negative whole number");
    }
    v as u64
}

fn parse_sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
    let name_end = line.find(['{', ' ', '\t']).ok_or("no value")?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        let mut chars = rest[1..].char_indices().peekable();
        let mut end = None;
        loop {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some(&(i, '}')) => {
                    end = Some(i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|x| x.1) != Some('"') {
                return Err(format!("label {key} value not quoted"));
            }
            let mut val = String::new();
            loop {
                match chars.next().map(|x| x.1) {
                    Some('\\') => match chars.next().map(|x| x.1) {
                        Some('n') => val.push('\n'),
                        Some(c) => val.push(c),
                        None => return Err("dangling escape".into()),
                    },
                    Some('"') => break,
                    Some(c) => val.push(c),
                    None => return Err("unterminated label value".into()),
                }
            }
            labels.insert(key.trim().to_string(), val);
        }
        let end = end.ok_or("unterminated label set")?;
        rest = &rest[1 + end + 1..];
    }
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok((name, labels, value))
}
