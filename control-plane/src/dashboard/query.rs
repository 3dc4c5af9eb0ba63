//! Query strings of the dashboard's API (`?since=24h&limit=50`): decoded
//! once, read by name, with errors that name the parameter.

use std::time::Duration;

use tonic::Status;

/// The decoded parameters of one request.
#[derive(Debug, Default)]
pub(super) struct Query(Vec<(String, String)>);

/// Decodes `%XX` and `+` (invalid escapes are kept as written).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'+' {
            out.push(b' ');
            i += 1;
            continue;
        }
        if b == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(hex) = std::str::from_utf8(hex)
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Query {
    /// Parses `raw` (the part after `?`, if any).
    pub(super) fn parse(raw: Option<&str>) -> Query {
        Query(
            raw.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    /// The last value of `name`, trimmed; `""` when absent.
    pub(super) fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.trim())
    }

    /// `name` as a count in `1..=max`, `default` when absent.
    pub(super) fn limit(&self, name: &str, default: u32, max: u32) -> Result<u32, Status> {
        match self.get(name) {
            "" => Ok(default),
            v => match v.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(n.min(max)),
                _ => Err(Status::invalid_argument(format!(
                    "{name}: must be a whole number >= 1, got `{v}`"
                ))),
            },
        }
    }

    /// `name` as a duration (`24h`, `7d`, `90m`), `default` when absent.
    pub(super) fn duration(&self, name: &str, default: Duration) -> Result<Duration, Status> {
        match self.get(name) {
            "" => Ok(default),
            v => match humantime::parse_duration(v) {
                Ok(d) if !d.is_zero() => Ok(d),
                _ => Err(Status::invalid_argument(format!(
                    "{name}: must be a duration such as 24h or 7d, got `{v}`"
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_decoded_and_checked_by_name() {
        let q = Query::parse(Some("model=gpt%2D4o&key=my+key&limit=5&since=7d&bad=%zz"));
        assert_eq!(q.get("model"), "gpt-4o");
        assert_eq!(q.get("key"), "my key");
        assert_eq!(q.get("bad"), "%zz");
        assert_eq!(q.get("absent"), "");
        assert_eq!(q.limit("limit", 50, 3).ok(), Some(3));
        assert_eq!(q.limit("absent", 50, 100).ok(), Some(50));
        assert_eq!(
            q.duration("since", Duration::ZERO).ok(),
            Some(Duration::from_secs(7 * 86_400))
        );
        let e = q.limit("model", 1, 1).expect_err("not a number");
        assert!(e.message().starts_with("model:"), "{}", e.message());
        let e = Query::parse(Some("since=soon"))
            .duration("since", Duration::ZERO)
            .expect_err("not a duration");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(Query::parse(None).get("x").is_empty());
    }
}
