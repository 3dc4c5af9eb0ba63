//! The `--model CANONICAL[=NATIVE][,in=..,out=..]` spec of `clawctl backend
//! add|update`: a clap value parser, like [`crate::duration`] and
//! [`crate::api_key`].

use claw_proto::v1::ModelMapping;

/// Parses `CANONICAL[=NATIVE][,in=X,out=Y,cache_read=X,cache_write=X,cache_write_1h=X,context=N,max_tokens=N]`.
/// Prices are USD per token, or USD per million tokens with the
/// `in_per_mtok`, `out_per_mtok`, `cache_read_per_mtok`,
/// `cache_write_per_mtok` and `cache_write_1h_per_mtok` keys (one of the two
/// spellings per price); `cache_write` prices 5-minute cache writes and
/// `cache_write_1h` 1-hour ones (unset: the 5-minute price);
/// without `=NATIVE` the native id is the canonical name.
pub(crate) fn parse_model_spec(spec: &str) -> Result<ModelMapping, String> {
    let mut parts = spec.split(',');
    let head = parts.next().unwrap_or_default().trim();
    let (canonical, native) = match head.split_once('=') {
        Some((c, n)) => (c.trim(), n.trim()),
        None => (head, head),
    };
    if canonical.is_empty() || native.is_empty() {
        return Err(format!(
            "{spec:?}: expected CANONICAL[=NATIVE][,in=USD,out=USD,...]"
        ));
    }
    let mut m = ModelMapping {
        canonical: canonical.to_string(),
        native: native.to_string(),
        ..Default::default()
    };
    let mut seen: Vec<&str> = Vec::new();
    // Which key set each price, so `in` and `in_per_mtok` together are an error.
    let mut prices: [Option<&str>; 5] = [None; 5];
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or_else(|| format!("{part:?}: expected KEY=VALUE"))?;
        if seen.contains(&key) {
            return Err(format!("{key} is given twice"));
        }
        seen.push(key);
        match key {
            "context" => m.context_window = tokens(key, value)?,
            "max_tokens" => m.max_tokens = tokens(key, value)?,
            _ => {
                let (slot, per_mtok) = price_key(key).ok_or_else(|| {
                    format!(
                        "unknown key {key:?}; expected in, out, cache_read, cache_write, \
                         cache_write_1h (USD per token), in_per_mtok, out_per_mtok, \
                         cache_read_per_mtok, cache_write_per_mtok, cache_write_1h_per_mtok \
                         (USD per million tokens), context or max_tokens"
                    )
                })?;
                if let Some(other) = prices[slot] {
                    return Err(format!(
                        "{other} and {key} are the same price; give only one"
                    ));
                }
                prices[slot] = Some(key);
                let v = if per_mtok {
                    price_per_mtok(key, value)? / 1_000_000.0
                } else {
                    price(key, value)?
                };
                match slot {
                    0 => m.input_cost_per_token = v,
                    1 => m.output_cost_per_token = v,
                    2 => m.cache_read_cost_per_token = v,
                    3 => m.cache_write_cost_per_token = v,
                    _ => m.cache_write_1h_cost_per_token = v,
                }
            }
        }
    }
    Ok(m)
}

fn price(key: &str, value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!(
            "{key}={value}: expected a price in USD per token, e.g. 0.0000025"
        )),
    }
}

/// The price a key sets (0 input, 1 output, 2 cache read, 3 5-minute cache
/// write, 4 1-hour cache write)
/// and whether it is per million tokens.
fn price_key(key: &str) -> Option<(usize, bool)> {
    let (base, per_mtok) = match key.strip_suffix("_per_mtok") {
        Some(base) => (base, true),
        None => (key, false),
    };
    let slot = match base {
        "in" => 0,
        "out" => 1,
        "cache_read" => 2,
        "cache_write" => 3,
        "cache_write_1h" => 4,
        _ => return None,
    };
    Some((slot, per_mtok))
}

fn price_per_mtok(key: &str, value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!(
            "{key}={value}: expected a price in USD per million tokens, e.g. 2.5"
        )),
    }
}

fn tokens(key: &str, value: &str) -> Result<u32, String> {
    value
        .parse::<u32>()
        .map_err(|_| format!("{key}={value}: expected a whole number of tokens"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_spec_without_native_maps_to_itself() {
        let m = parse_model_spec("gpt-4o").expect("valid");
        assert_eq!(
            (m.canonical.as_str(), m.native.as_str()),
            ("gpt-4o", "gpt-4o")
        );
        assert_eq!(m.input_cost_per_token, 0.0);
    }

    #[test]
    fn model_spec_with_native_prices_and_limits() {
        let m = parse_model_spec(
            "gpt-4o=gpt-4o-2024-08-06,in=0.0000025,out=1e-5,cache_read=0.00000125,cache_write=0,context=128000,max_tokens=16384",
        )
        .expect("valid");
        assert_eq!(m.canonical, "gpt-4o");
        assert_eq!(m.native, "gpt-4o-2024-08-06");
        assert_eq!(m.input_cost_per_token, 0.0000025);
        assert_eq!(m.output_cost_per_token, 0.00001);
        assert_eq!(m.cache_read_cost_per_token, 0.00000125);
        assert_eq!(m.context_window, 128_000);
        assert_eq!(m.max_tokens, 16_384);
        let m = parse_model_spec("llama3,in=0.1").expect("valid");
        assert_eq!(m.native, "llama3");
        let m = parse_model_spec("a=accounts/x/models/y=z").expect("valid");
        assert_eq!(m.native, "accounts/x/models/y=z");
    }

    #[test]
    fn model_spec_errors() {
        for bad in [
            "",
            "=native",
            "gpt=",
            "gpt,in",
            "gpt,in=abc",
            "gpt,in=-1",
            "gpt,in=NaN",
            "gpt,context=1.5",
            "gpt,price=1",
            "gpt,in=1,in=2",
            "gpt,in_per_mtok=abc",
            "gpt,in_per_mtok=-1",
            "gpt,in_per_mtok=inf",
            "gpt,out_per_mtok=1,out_per_mtok=2",
            "gpt,per_mtok=1",
            "gpt,context_per_mtok=1",
            "gpt,cache_write_1h=-1",
            "gpt,cache_write_1h=inf",
            "gpt,cache_write_1h_per_mtok=NaN",
            "gpt,cache_write_2h=1",
        ] {
            assert!(parse_model_spec(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn model_spec_prices_per_million_tokens() {
        let m = parse_model_spec(
            "claude=claude-sonnet-4,in_per_mtok=3,out_per_mtok=15,cache_read_per_mtok=0.3,cache_write_per_mtok=3.75",
        )
        .expect("valid");
        assert_eq!(m.input_cost_per_token, 3.0 / 1e6);
        assert_eq!(m.output_cost_per_token, 15.0 / 1e6);
        assert_eq!(m.cache_read_cost_per_token, 0.3 / 1e6);
        assert_eq!(m.cache_write_cost_per_token, 3.75 / 1e6);
        assert_eq!(
            m.cache_write_1h_cost_per_token, 0.0,
            "unset: the 5m price applies"
        );
        let m = parse_model_spec("claude,cache_write_per_mtok=3.75,cache_write_1h_per_mtok=6")
            .expect("valid");
        assert_eq!(m.cache_write_cost_per_token, 3.75 / 1e6);
        assert_eq!(m.cache_write_1h_cost_per_token, 6.0 / 1e6);
        let m = parse_model_spec("claude,cache_write_1h=0.000006").expect("valid");
        assert_eq!(m.cache_write_1h_cost_per_token, 0.000006);
        let m = parse_model_spec("gpt-4o,in_per_mtok=2.5,out=0.00001").expect("valid");
        assert_eq!(m.input_cost_per_token, 0.0000025);
        assert_eq!(m.output_cost_per_token, 0.00001);
    }

    #[test]
    fn a_price_given_both_ways_names_both_keys() {
        for (spec, first, second) in [
            ("gpt,in=0.000001,in_per_mtok=1", "in", "in_per_mtok"),
            ("gpt,out_per_mtok=1,out=0.000001", "out_per_mtok", "out"),
            (
                "gpt,cache_read=0,cache_read_per_mtok=0",
                "cache_read",
                "cache_read_per_mtok",
            ),
            (
                "gpt,cache_write_per_mtok=1,cache_write=1",
                "cache_write_per_mtok",
                "cache_write",
            ),
            (
                "gpt,cache_write_1h=0,cache_write_1h_per_mtok=0",
                "cache_write_1h",
                "cache_write_1h_per_mtok",
            ),
        ] {
            let err = parse_model_spec(spec).expect_err(spec);
            assert_eq!(
                err,
                format!("{first} and {second} are the same price; give only one"),
                "{spec}"
            );
        }
    }
}
