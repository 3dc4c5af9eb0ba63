//! Paging of the list RPCs (`ListBackends`, `ListClientKeys`, `ListAgents`).
//!
//! Pages follow a stable order (backends and keys by name, agents by id);
//! the page token is opaque to clients and is today the last sort key of
//! the previous page, so a resource created or deleted between two pages
//! neither shifts the others nor is listed twice. `page_size` 0 — what a
//! client from before paging sends — returns up to [`UNPAGED_CAP`] at once
//! (such a client saw everything before, and still does up to the cap); any
//! other size is capped at [`MAX_PAGE_SIZE`]. clawctl asks for 500.
//!
//! A page is a range read of the catalog starting after the token (the name
//! index for backends and keys, the id tree for agents), so it costs its own
//! size, not the size of the list: listing n resources page by page is O(n).

use tonic::Status;

/// The largest page a client may ask for.
pub(crate) const MAX_PAGE_SIZE: u32 = 5000;
/// The page of a request without `page_size`: large enough that a client
/// from before paging sees what it saw before (its 4 MiB decode limit held
/// fewer resources anyway), bounded so that no answer grows with the fleet.
pub(crate) const UNPAGED_CAP: u32 = 25_000;
/// The longest page token accepted (names and ids are at most 256 bytes).
const MAX_TOKEN_LEN: usize = 1024;

/// One page: `read(after, limit)` returns up to `limit` items whose sort
/// key (`key`) is strictly after `after` (`""`: from the first), in that
/// order — a range read of the catalog, never the whole list. The page is at
/// most `page_size` long (see the module doc); one extra item is read to
/// tell whether another page follows, whose token is returned (empty on the
/// last page). A token longer than any key is refused naming `page_token`.
pub(crate) fn page<T, E>(
    page_size: u32,
    token: &str,
    read: impl FnOnce(&str, usize) -> Result<Vec<T>, E>,
    key: impl Fn(&T) -> &str,
) -> Result<(Vec<T>, String), Status>
where
    Status: From<E>,
{
    if token.len() > MAX_TOKEN_LEN {
        return Err(Status::invalid_argument(format!(
            "page_token: longer than {MAX_TOKEN_LEN} bytes (pass the next_page_token of the previous page)"
        )));
    }
    let size = match page_size {
        0 => UNPAGED_CAP,
        n => n.min(MAX_PAGE_SIZE),
    } as usize;
    let mut page = read(token, size + 1)?;
    let next = if page.len() > size {
        page.truncate(size);
        page.last().map(|i| key(i).to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    Ok((page, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("k{i:05}")).collect()
    }

    /// What the catalog's range read does over a sorted list: the items
    /// after `after`, at most `limit`, counting how many it handed out.
    fn reader<'a>(
        items: &'a [String],
        read: &'a std::cell::Cell<usize>,
    ) -> impl FnOnce(&str, usize) -> Result<Vec<String>, Status> + 'a {
        move |after, limit| {
            let start = if after.is_empty() {
                0
            } else {
                items.partition_point(|i| i.as_str() <= after)
            };
            let out: Vec<String> = items[start..].iter().take(limit).cloned().collect();
            read.set(read.get() + out.len());
            Ok(out)
        }
    }

    fn page_of(items: &[String], size: u32, token: &str) -> Result<(Vec<String>, String), Status> {
        let read = std::cell::Cell::new(0);
        let out = page(size, token, reader(items, &read), |s| s.as_str())?;
        // A page reads its own size and one more, never the whole list.
        let cap = match size {
            0 => UNPAGED_CAP,
            n => n.min(MAX_PAGE_SIZE),
        } as usize;
        assert!(read.get() <= cap + 1);
        Ok(out)
    }

    fn all_pages(items: Vec<String>, size: u32) -> (Vec<String>, usize) {
        let (mut out, mut token, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let (page, next) = page_of(&items, size, &token).expect("a valid token");
            pages += 1;
            assert!(page.len() <= size.min(MAX_PAGE_SIZE) as usize);
            out.extend(page);
            if next.is_empty() {
                return (out, pages);
            }
            token = next;
        }
    }

    #[test]
    fn pages_cover_everything_once_in_order() {
        let (out, pages) = all_pages(names(1234), 500);
        assert_eq!(pages, 3);
        let mut want = names(1234);
        want.sort();
        assert_eq!(out, want);
        // An exact multiple ends without an empty extra page.
        let (out, pages) = all_pages(names(1000), 500);
        assert_eq!((out.len(), pages), (1000, 2));
        let (out, pages) = all_pages(Vec::new(), 500);
        assert_eq!((out.len(), pages), (0, 1));
    }

    #[test]
    fn sizes_are_capped_and_zero_means_the_unpaged_cap() {
        let (p, next) = page_of(&names(6000), 100_000, "").expect("no token");
        assert_eq!(p.len(), MAX_PAGE_SIZE as usize);
        assert_eq!(next, "k04999");
        let (p, next) = page_of(&names(6000), 0, "").expect("no token");
        assert_eq!((p.len(), next.as_str()), (6000, ""));
        let (p, next) = page_of(&names(30_000), 0, "").expect("no token");
        assert_eq!(p.len(), UNPAGED_CAP as usize);
        assert_eq!(next, format!("k{:05}", UNPAGED_CAP - 1));
    }

    #[test]
    fn a_created_resource_between_pages_is_not_skipped_nor_repeated() {
        let mut items = names(10);
        let (first, token) = page_of(&items, 5, "").expect("no token");
        assert_eq!(token, "k00004");
        // Created before the token (shows up nowhere: it sorts before the
        // page already read) and after it (shows up on the next page).
        items.push("k00002a".into());
        items.push("k00007a".into());
        items.sort();
        let (second, next) = page_of(&items, 5, &token).expect("a valid token");
        assert_eq!(next, "k00008");
        assert!(second.iter().all(|s| !first.contains(s)));
        assert!(second.contains(&"k00007a".to_string()));
    }

    #[test]
    fn an_oversized_token_is_refused_naming_the_field() {
        let e = page_of(&names(3), 5, &"x".repeat(2000)).expect_err("an oversized token");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("page_token:"));
    }
}
