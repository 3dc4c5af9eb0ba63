//! Allocation-free JSON scanning, for the two places the proxy reads one
//! thing out of a large document on every request (BENCHMARKS.md: both are
//! hot). Each is checked against serde in its caller's tests, and whatever
//! it does not vouch for goes to serde whole.
//!
//! - [`Shape`]: a serde visitor that steps over any value the way `Value`
//!   would parse it (same documents accepted), keeping only `true` and
//!   unsigned integers — how [`crate::route::body::scan_body`] reads the
//!   request's `model`, `stream` and output cap through serde without a DOM.
//! - [`top_level_member`]: a byte scan (memchr over strings, a bracket stack
//!   over containers) that finds the span of one top-level member — how
//!   [`crate::usage::Usage::from_answer`] finds `usage` (and
//!   `crate::usage::answer_id` a stored response's `id`) in an answer
//!   without parsing the completion text.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// The shape of a JSON value as far as routing cares. Deserialising it goes
/// through `deserialize_any` all the way down, exactly like `Value` does, so
/// it accepts and rejects the same documents, without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// `true`.
    True,
    /// An unsigned integer (a non-negative `i64` included).
    U64(u64),
    /// Anything else, validated and stepped over.
    Other,
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Shape;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, b: bool) -> Result<Shape, E> {
                Ok(if b { Shape::True } else { Shape::Other })
            }
            fn visit_u64<E>(self, n: u64) -> Result<Shape, E> {
                Ok(Shape::U64(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Shape, E> {
                Ok(u64::try_from(n).map_or(Shape::Other, Shape::U64))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
                Ok(Shape::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
                Ok(Shape::Other)
            }
            fn visit_unit<E>(self) -> Result<Shape, E> {
                Ok(Shape::Other)
            }
            fn visit_none<E>(self) -> Result<Shape, E> {
                Ok(Shape::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Shape, A::Error> {
                while a.next_element::<Shape>()?.is_some() {}
                Ok(Shape::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Shape, A::Error> {
                while a.next_key::<Shape>()?.is_some() {
                    a.next_value::<Shape>()?;
                }
                Ok(Shape::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// What [`top_level_member`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Member {
    /// The member's value spans these bytes.
    Found(std::ops::Range<usize>),
    /// The object has no such member.
    Absent,
    /// Not a shape the scan vouches for: parse it properly.
    Unsure,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// `b[i]` opens a string: the index after its closing quote.
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
        if b[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
    }
}

/// `b[i]` starts a value: the index after it. Strings and brackets are
/// followed exactly (up to 128 levels); scalars are taken as the run of
/// bytes a number or literal can hold.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            // One bit per open bracket: 1 for an object.
            let mut stack: u128 = 0;
            let mut depth = 0u32;
            let mut j = i;
            loop {
                match *b.get(j)? {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    c @ (b'{' | b'[') => {
                        if depth == 128 {
                            return None;
                        }
                        stack = (stack << 1) | u128::from(c == b'{');
                        depth += 1;
                    }
                    c @ (b'}' | b']') => {
                        if depth == 0 || (stack & 1 == 1) != (c == b'}') {
                            return None;
                        }
                        stack >>= 1;
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let n = b[i..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.'))
                .count();
            (n > 0).then_some(i + n)
        }
    }
}

/// Finds the value of the top-level member `key` of the JSON object `b`
/// by stepping over the others. `Unsure` whenever the body is not plainly
/// one object whose keys need no unescaping and that holds `key` at most
/// once.
#[inline]
pub(crate) fn top_level_member(b: &[u8], key: &[u8]) -> Member {
    let scan = || -> Option<Option<std::ops::Range<usize>>> {
        let mut i = skip_ws(b, 0);
        if b.get(i) != Some(&b'{') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let mut found = None;
        if b.get(i) == Some(&b'}') {
            i += 1;
        } else {
            loop {
                if b.get(i) != Some(&b'"') {
                    return None;
                }
                let end = skip_string(b, i)?;
                let name = &b[i + 1..end - 1];
                if name.contains(&b'\\') {
                    return None;
                }
                i = skip_ws(b, end);
                if b.get(i) != Some(&b':') {
                    return None;
                }
                let start = skip_ws(b, i + 1);
                i = skip_value(b, start)?;
                if name == key {
                    if found.is_some() {
                        return None;
                    }
                    found = Some(start..i);
                }
                i = skip_ws(b, i);
                match b.get(i) {
                    Some(b',') => i = skip_ws(b, i + 1),
                    Some(b'}') => {
                        i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        (skip_ws(b, i) == b.len()).then_some(found)
    };
    match scan() {
        Some(Some(range)) => Member::Found(range),
        Some(None) => Member::Absent,
        None => Member::Unsure,
    }
}
