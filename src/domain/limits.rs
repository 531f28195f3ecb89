/// Size limits applied to requests. The defaults are the contract's; an
/// operator may lower them, never raise them past the database's own CHECK
/// constraints, which hold the contract's values as ceilings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_title_chars: usize,
    pub max_metadata_pairs: usize,
    pub max_metadata_key_chars: usize,
    pub max_metadata_value_chars: usize,
    pub max_content_bytes: usize,
    pub max_batch_messages: usize,
    pub default_page_size: u32,
    pub max_page_size: u32,
}

impl Limits {
    /// The contract's limits, which are also the ceilings the schema enforces.
    pub const CONTRACT: Limits = Limits {
        max_title_chars: 256,
        max_metadata_pairs: 16,
        max_metadata_key_chars: 64,
        max_metadata_value_chars: 512,
        max_content_bytes: 1024 * 1024,
        max_batch_messages: 100,
        default_page_size: 50,
        max_page_size: 1000,
    };

    /// The longest request_id and user id, in bytes.
    pub const MAX_KEY_BYTES: usize = 128;
}
