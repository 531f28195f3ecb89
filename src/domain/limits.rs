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
    /// Parts of one message.
    pub max_parts: usize,
    /// Inline `data` of one blob, in bytes.
    pub max_inline_data_bytes: usize,
    /// A blob's `uri`, in characters.
    pub max_uri_chars: usize,
    /// A part's opaque provider `signature`, in bytes.
    pub max_signature_bytes: usize,
    /// A message's `name` and `model`, a tool's name, a blob's file name.
    pub max_name_chars: usize,
    /// A tool call's id, in bytes of visible ASCII.
    pub max_tool_call_id_bytes: usize,
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
        max_parts: 64,
        max_inline_data_bytes: 256 * 1024,
        max_uri_chars: 2048,
        max_signature_bytes: 64 * 1024,
        max_name_chars: 256,
        max_tool_call_id_bytes: 256,
    };

    /// The longest request_id and user id, in bytes.
    pub const MAX_KEY_BYTES: usize = 128;
}
