//! Keyset pagination: how big a page is, what a page holds, and where the
//! next one starts. Each listing's cursor is built here, from the last item of
//! a page, with the same keys the store orders that listing by; the store
//! returns every page with its continuation. How a cursor travels to a client
//! (a sealed token) is the gRPC edge's business (`grpc/page_token.rs`).

use chrono::{DateTime, Utc};

use super::{Conversation, ConversationId, FieldViolation, Limits, Message, SearchHit};

/// How many rows a page holds: 0 asks for the default, anything above the
/// maximum is clamped to it, and a negative size is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSize(u32);

impl PageSize {
    pub fn parse(field: &str, requested: i32, limits: &Limits) -> Result<Self, FieldViolation> {
        match requested {
            n if n < 0 => Err(FieldViolation::new(
                field,
                format!(
                    "{field} must not be negative (0 means the default, {})",
                    limits.default_page_size
                ),
            )),
            0 => Ok(Self(limits.default_page_size)),
            n => Ok(Self((n as u32).min(limits.max_page_size))),
        }
    }

    /// A size chosen by the service itself, checked when compiled.
    pub const fn fixed(size: u32) -> Self {
        assert!(size >= 1 && size <= Limits::CONTRACT.max_page_size);
        Self(size)
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// The page size as a SQL LIMIT, plus one row to learn whether more follow.
    pub fn limit_with_lookahead(self) -> i64 {
        i64::from(self.0) + 1
    }
}

/// One page of a listing, and where the next page starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T, C> {
    pub items: Vec<T>,
    /// The cursor after the last item; `None` on the last page.
    pub next: Option<C>,
}

impl<T, C> Page<T, C> {
    /// Cuts rows fetched with [`PageSize::limit_with_lookahead`] to one page.
    /// When a row follows the page, `cursor_after` the page's last item is
    /// where the next page starts.
    pub fn cut(mut items: Vec<T>, size: PageSize, cursor_after: impl FnOnce(&T) -> C) -> Self {
        let size = size.get() as usize;
        let more = items.len() > size;
        items.truncate(size);
        let next = match items.last() {
            Some(last) if more => Some(cursor_after(last)),
            _ => None,
        };
        Self { items, next }
    }
}

impl<T, C> Page<T, C> {
    /// Keeps the longest prefix of the page whose items' sizes add up to at
    /// most `budget` bytes (never fewer than one item, so a listing always
    /// moves on). When items are left out, the page continues after the last
    /// one kept, so a client with a default receive limit can still page
    /// through everything.
    pub fn fit(
        mut self,
        budget: usize,
        size: impl Fn(&T) -> usize,
        cursor_after: impl FnOnce(&T) -> C,
    ) -> Self {
        let mut used = 0;
        let keep = self
            .items
            .iter()
            .take_while(|item| {
                used += size(item);
                used <= budget
            })
            .count()
            .max(1);
        if keep < self.items.len() {
            self.items.truncate(keep);
            self.next = self.items.last().map(cursor_after);
        }
        self
    }
}

/// The order of a message listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageOrder {
    OldestFirst,
    NewestFirst,
}

/// Where a page of ListConversations ended. Conversations are listed most
/// recently updated first: `(update_time DESC, id DESC)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationCursor {
    pub update_time: DateTime<Utc>,
    pub id: ConversationId,
}

impl ConversationCursor {
    pub fn after(last: &Conversation) -> Self {
        Self {
            update_time: last.update_time,
            id: last.id,
        }
    }
}

/// Where a page of ListMessages ended, and which listing it belongs to: a
/// cursor continues only the conversation and order it was issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageCursor {
    pub conversation_id: ConversationId,
    pub order: MessageOrder,
    pub sequence: i64,
}

impl MessageCursor {
    pub fn after(order: MessageOrder, last: &Message) -> Self {
        Self {
            conversation_id: last.conversation_id,
            order,
            sequence: last.sequence,
        }
    }
}

/// Where a page of SearchMessages ended. Hits are ordered by
/// `(rank DESC, conversation_id DESC, sequence DESC)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchCursor {
    pub rank: f32,
    pub conversation_id: ConversationId,
    pub sequence: i64,
}

impl SearchCursor {
    pub fn after(last: &SearchHit) -> Self {
        Self {
            rank: last.rank,
            conversation_id: last.message.conversation_id,
            sequence: last.message.sequence,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_defaults_clamps_and_rejects_negative() {
        let limits = Limits::CONTRACT;
        assert_eq!(PageSize::parse("page_size", 0, &limits).unwrap().get(), 50);
        assert_eq!(PageSize::parse("page_size", 1, &limits).unwrap().get(), 1);
        assert_eq!(
            PageSize::parse("page_size", 1000, &limits).unwrap().get(),
            1000
        );
        assert_eq!(
            PageSize::parse("page_size", 1001, &limits).unwrap().get(),
            1000
        );
        assert_eq!(
            PageSize::parse("page_size", i32::MAX, &limits)
                .unwrap()
                .get(),
            1000
        );
        assert!(PageSize::parse("page_size", -1, &limits).is_err());
    }

    #[test]
    fn a_page_that_would_be_too_large_ends_early_and_continues() {
        let size = PageSize::fixed(10);
        let page = Page::cut(vec![3, 3, 3, 3], size, |last| *last * 100);
        let fitted = page.fit(7, |n| *n as usize, |last| *last * 10);
        assert_eq!(fitted.items, vec![3, 3]);
        assert_eq!(fitted.next, Some(30), "continues after the last item kept");
        // One item always goes out, however large, so a listing moves on.
        let huge = Page::cut(vec![50, 1], size, |last| *last).fit(7, |n| *n as usize, |l| *l);
        assert_eq!(huge.items, vec![50]);
        assert_eq!(huge.next, Some(50));
        // What fits is left alone, next included.
        let small =
            Page::cut(vec![1, 1, 1], PageSize::fixed(2), |l| *l).fit(7, |n| *n as usize, |_| 99);
        assert_eq!(small.items, vec![1, 1]);
        assert_eq!(small.next, Some(1));
    }

    #[test]
    fn a_page_continues_only_when_a_row_follows_it() {
        let size = PageSize::fixed(3);
        let full = Page::cut(vec![1, 2, 3, 4], size, |last| *last);
        assert_eq!(full.items, vec![1, 2, 3]);
        assert_eq!(full.next, Some(3));
        let last = Page::cut(vec![1, 2, 3], size, |last| *last);
        assert_eq!(last.items, vec![1, 2, 3]);
        assert_eq!(last.next, None);
        let empty = Page::cut(Vec::<i32>::new(), size, |last| *last);
        assert_eq!(empty.next, None);
    }
}
