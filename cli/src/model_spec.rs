//! The `--model CANONICAL[=NATIVE][,in=..,out=..]` spec of `clawctl backend
//! add|update`: a clap value parser, like [`crate::duration`] and
//! [`crate::api_key`].

use claw_proto::v1::ModelMapping;

/// Parses `CANONICAL[=NATIVE][,in=X,out=Y,cache_read=X,cache_write=X,context=N,max_tokens=N]`.
/// Prices are USD per token; without `=NATIVE` the native id is the
/// canonical name.
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
    let mut seen = Vec::new();
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
            "in" => m.input_cost_per_token = price(key, value)?,
            "out" => m.output_cost_per_token = price(key, value)?,
            "cache_read" => m.cache_read_cost_per_token = price(key, value)?,
            "cache_write" => m.cache_write_cost_per_token = price(key, value)?,
            "context" => m.context_window = tokens(key, value)?,
            "max_tokens" => m.max_tokens = tokens(key, value)?,
            other => {
                return Err(format!(
                    "unknown key {other:?}; expected in, out, cache_read, cache_write, context or max_tokens"
                ));
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
        ] {
            assert!(parse_model_spec(bad).is_err(), "{bad:?} accepted");
        }
    }
}
