//! Structured messages: typed parts, name, model, usage, tool exchange
//! integrity, resume that never splits an exchange, and TruncateConversation.

use std::time::Duration;

use convo::grpc::proto::{
    self, AppendMessageRequest, AppendMessagesRequest, Part, Role, part::Kind,
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{
    Client, TestApp, all_messages, append, create, expect_code, expect_invalid, watch,
};

fn text(t: &str) -> Part {
    Part {
        kind: Some(Kind::Text(t.into())),
        signature: Vec::new(),
    }
}

fn call(id: &str, name: &str, arguments: &str) -> Part {
    Part {
        kind: Some(Kind::ToolCall(proto::ToolCall {
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
        })),
        signature: Vec::new(),
    }
}

fn result(id: &str, content: &str) -> Part {
    Part {
        kind: Some(Kind::ToolResult(proto::ToolResult {
            tool_call_id: id.into(),
            content: content.into(),
            ..Default::default()
        })),
        signature: Vec::new(),
    }
}

fn reasoning(t: &str, signature: &[u8]) -> Part {
    Part {
        kind: Some(Kind::Reasoning(proto::Reasoning { text: t.into() })),
        signature: signature.to_vec(),
    }
}

fn blob(mime_type: &str, uri: &str, data: &[u8]) -> proto::Blob {
    proto::Blob {
        mime_type: mime_type.into(),
        uri: uri.into(),
        data: data.to_vec(),
        name: String::new(),
    }
}

fn message(role: Role, parts: Vec<Part>) -> proto::NewMessage {
    proto::NewMessage {
        role: role as i32,
        parts,
        ..Default::default()
    }
}

fn usage(input: i64, output: i64, cached: i64, reasoning: i64) -> proto::Usage {
    proto::Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        reasoning_tokens: reasoning,
    }
}

async fn append_batch(
    client: &mut Client,
    conversation_id: &str,
    messages: Vec<proto::NewMessage>,
) -> Result<Vec<proto::Message>, tonic::Status> {
    client
        .append_messages(AppendMessagesRequest {
            conversation_id: conversation_id.into(),
            messages,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().messages)
}

async fn conversation(client: &mut Client, id: &str) -> proto::Conversation {
    client
        .get_conversation(proto::GetConversationRequest {
            conversation_id: id.into(),
        })
        .await
        .expect("get the conversation")
        .into_inner()
}

async fn resume(client: &mut Client, id: &str, max: i32) -> proto::ResumeConversationResponse {
    client
        .resume_conversation(proto::ResumeConversationRequest {
            conversation_id: id.into(),
            max_messages: max,
        })
        .await
        .expect("resume")
        .into_inner()
}

/// Asserts a stored message carries exactly the new message's payload.
#[track_caller]
fn assert_same_payload(stored: &proto::Message, sent: &proto::NewMessage) {
    assert_eq!(stored.role, sent.role);
    assert_eq!(stored.parts, sent.parts, "parts come back byte for byte");
    assert_eq!(stored.name, sent.name);
    assert_eq!(stored.model, sent.model);
    assert_eq!(stored.usage, sent.usage);
    assert_eq!(stored.metadata, sent.metadata);
}

#[tokio::test]
async fn an_openai_tool_loop_round_trips_byte_for_byte() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "openai").await;
    // Responses API items: two function_call items (arguments as the model
    // streamed them, one not even valid JSON), their outputs, the answer.
    let turn = vec![
        proto::NewMessage {
            role: Role::Developer as i32,
            content: "Answer in one sentence.".into(),
            ..Default::default()
        },
        proto::NewMessage {
            role: Role::User as i32,
            content: "Weather in Lisbon and Porto?".into(),
            ..Default::default()
        },
        proto::NewMessage {
            model: "gpt-4.1-2025-04-14".into(),
            usage: Some(usage(812, 64, 512, 0)),
            ..message(
                Role::Assistant,
                vec![
                    call("call_Xq1", "get_weather", r#"{"city":"Lisbon"}"#),
                    call("call_Xq2", "get_weather", r#"{"city": "Porto", "unit": "#),
                ],
            )
        },
        proto::NewMessage {
            name: "get_weather".into(),
            ..message(Role::Tool, vec![result("call_Xq1", "21°C, sunny")])
        },
        proto::NewMessage {
            name: "get_weather".into(),
            ..message(Role::Tool, vec![result("call_Xq2", "18°C, cloudy")])
        },
        proto::NewMessage {
            model: "gpt-4.1-2025-04-14".into(),
            usage: Some(usage(900, 20, 800, 0)),
            ..message(
                Role::Assistant,
                vec![text("Lisbon is 21°C and sunny; Porto 18°C and cloudy.")],
            )
        },
    ];
    let stored = append_batch(&mut alice, &created.id, turn.clone())
        .await
        .expect("append the turn");
    let listed = all_messages(&mut alice, &created.id).await;
    assert_eq!(listed, stored, "what the append returned is what is stored");
    for (stored, sent) in stored.iter().zip(&turn) {
        assert_same_payload(stored, sent);
    }
    // Content-only messages keep their content and have no parts.
    assert_eq!(stored[0].content, "Answer in one sentence.");
    assert_eq!(stored[0].role, Role::Developer as i32);
    assert!(stored[0].usage.is_none());
    // The text projection: text parts and tool-result contents.
    assert_eq!(stored[2].content, "", "tool calls alone project no text");
    assert_eq!(stored[3].content, "21°C, sunny");
    assert_eq!(
        stored[5].content,
        "Lisbon is 21°C and sunny; Porto 18°C and cloudy."
    );
    // Usage summed on the conversation.
    let after = conversation(&mut alice, &created.id).await;
    assert_eq!(after.usage, Some(usage(1712, 84, 1312, 0)));
}

#[tokio::test]
async fn an_anthropic_turn_keeps_thinking_signatures_and_images() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "anthropic").await;
    let signature: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let png = [0x89, b'P', b'N', b'G', 0, 0, 0, 0x0d, 0xff];
    let turn = vec![
        proto::NewMessage {
            role: Role::User as i32,
            parts: vec![
                text("What is in these pictures?"),
                Part {
                    kind: Some(Kind::Blob(blob(
                        "image/jpeg",
                        "https://example.com/cat.jpg",
                        &[],
                    ))),
                    signature: Vec::new(),
                },
                Part {
                    kind: Some(Kind::Blob(proto::Blob {
                        name: "dog.png".into(),
                        ..blob("image/png", "", &png)
                    })),
                    signature: Vec::new(),
                },
            ],
            ..Default::default()
        },
        proto::NewMessage {
            model: "claude-sonnet-4-5".into(),
            usage: Some(usage(1500, 300, 0, 120)),
            ..message(
                Role::Assistant,
                vec![
                    reasoning("Two images; I should zoom into the second.", &signature),
                    text("Let me look closer."),
                    call("toolu_01A", "zoom", r#"{"image": 2, "factor": 2}"#),
                ],
            )
        },
        message(
            Role::Tool,
            vec![Part {
                kind: Some(Kind::ToolResult(proto::ToolResult {
                    tool_call_id: "toolu_01A".into(),
                    content: "zoomed".into(),
                    is_error: false,
                    attachments: vec![blob("image/png", "", &png)],
                })),
                signature: Vec::new(),
            }],
        ),
        message(
            Role::Tool,
            vec![Part {
                kind: Some(Kind::ToolResult(proto::ToolResult {
                    tool_call_id: "toolu_01A".into(),
                    content: "zoom failed: too small".into(),
                    is_error: true,
                    attachments: Vec::new(),
                })),
                signature: Vec::new(),
            }],
        ),
    ];
    let stored = append_batch(&mut alice, &created.id, turn.clone())
        .await
        .expect("append the turn");
    let resumed = resume(&mut alice, &created.id, 0).await;
    assert_eq!(resumed.messages, stored);
    for (stored, sent) in stored.iter().zip(&turn) {
        assert_same_payload(stored, sent);
    }
    assert_eq!(stored[0].content, "What is in these pictures?");
    assert_eq!(stored[1].content, "Let me look closer.");
}

#[tokio::test]
async fn a_gemini_function_call_keeps_its_thought_signature() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "gemini").await;
    let thought_signature = vec![0u8, 1, 2, 0xfe, 0xff, 0, 0x80];
    let call_part = Part {
        signature: thought_signature.clone(),
        ..call("fc-1", "lookup_order", r#"{"order_id": 42}"#)
    };
    let sent = proto::NewMessage {
        model: "gemini-2.5-pro".into(),
        usage: Some(usage(10, 5, 0, 3)),
        ..message(Role::Assistant, vec![call_part])
    };
    let stored = client_append_one(&mut alice, &created.id, sent.clone()).await;
    assert_same_payload(&stored, &sent);
    let answer = client_append_one(
        &mut alice,
        &created.id,
        message(
            Role::Tool,
            vec![result("fc-1", "{\"status\": \"shipped\"}")],
        ),
    )
    .await;
    assert_eq!(answer.sequence, 2);
    let listed = all_messages(&mut alice, &created.id).await;
    assert_eq!(listed[0].parts[0].signature, thought_signature);
}

/// AppendMessage with the fields of a NewMessage.
async fn client_append_one(
    client: &mut Client,
    conversation_id: &str,
    m: proto::NewMessage,
) -> proto::Message {
    client
        .append_message(AppendMessageRequest {
            conversation_id: conversation_id.into(),
            role: m.role,
            content: m.content,
            metadata: m.metadata,
            parts: m.parts,
            name: m.name,
            model: m.model,
            usage: m.usage,
            ..Default::default()
        })
        .await
        .expect("append one message")
        .into_inner()
}

#[tokio::test]
async fn every_rule_of_parts_is_checked_at_the_edge_with_its_field_path() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "rules").await;
    let id = created.id.clone();
    let with = |m: proto::NewMessage| AppendMessagesRequest {
        conversation_id: id.clone(),
        messages: vec![message(Role::User, vec![text("fine")]), m],
        ..Default::default()
    };
    let cases: Vec<(proto::NewMessage, &str)> = vec![
        (
            proto::NewMessage {
                content: "both".into(),
                ..message(Role::User, vec![text("x")])
            },
            "messages[1].parts",
        ),
        (message(Role::User, vec![]), "messages[1].content"),
        (
            message(Role::User, vec![text("a"), call("c1", "f", "{}")]),
            "messages[1].parts[1].tool_call",
        ),
        (
            message(Role::Assistant, vec![result("c1", "x")]),
            "messages[1].parts[0].tool_result",
        ),
        (
            message(Role::Tool, vec![reasoning("r", b"")]),
            "messages[1].parts[0].reasoning",
        ),
        (
            message(Role::User, vec![text("x"); 65]),
            "messages[1].parts",
        ),
        (
            message(
                Role::User,
                vec![text(&"x".repeat(600 * 1024)), text(&"y".repeat(600 * 1024))],
            ),
            "messages[1].parts",
        ),
        (
            message(
                Role::User,
                vec![Part {
                    kind: None,
                    signature: Vec::new(),
                }],
            ),
            "messages[1].parts[0]",
        ),
        (
            message(Role::User, vec![text("nul\0here")]),
            "messages[1].parts[0].text",
        ),
        (
            message(Role::Assistant, vec![call("has space", "f", "{}")]),
            "messages[1].parts[0].tool_call.id",
        ),
        (
            message(Role::Assistant, vec![call(&"x".repeat(257), "f", "{}")]),
            "messages[1].parts[0].tool_call.id",
        ),
        (
            message(Role::Assistant, vec![call("c1", "", "{}")]),
            "messages[1].parts[0].tool_call.name",
        ),
        (
            message(Role::Assistant, vec![call("c1", "bad\nname", "{}")]),
            "messages[1].parts[0].tool_call.name",
        ),
        (
            message(Role::Assistant, vec![call("c1", &"n".repeat(257), "{}")]),
            "messages[1].parts[0].tool_call.name",
        ),
        (
            message(Role::Tool, vec![result("", "x")]),
            "messages[1].parts[0].tool_result.tool_call_id",
        ),
        (
            message(
                Role::Assistant,
                vec![call("dup", "f", "{}"), call("dup", "g", "{}")],
            ),
            "messages[1].parts[1].tool_call.id",
        ),
        (
            message(
                Role::User,
                vec![Part {
                    kind: Some(Kind::Blob(blob("image/png", "https://x/y", b"data"))),
                    signature: Vec::new(),
                }],
            ),
            "messages[1].parts[0].blob",
        ),
        (
            message(
                Role::User,
                vec![Part {
                    kind: Some(Kind::Blob(blob("image/png", "", b""))),
                    signature: Vec::new(),
                }],
            ),
            "messages[1].parts[0].blob",
        ),
        (
            message(
                Role::User,
                vec![Part {
                    kind: Some(Kind::Blob(blob("png", "https://x/y", b""))),
                    signature: Vec::new(),
                }],
            ),
            "messages[1].parts[0].blob.mime_type",
        ),
        (
            message(
                Role::User,
                vec![Part {
                    kind: Some(Kind::Blob(blob("image/png", "", &vec![7; 256 * 1024 + 1]))),
                    signature: Vec::new(),
                }],
            ),
            "messages[1].parts[0].blob.data",
        ),
        (
            message(
                Role::User,
                vec![Part {
                    kind: Some(Kind::Blob(blob("image/png", &"u".repeat(2049), b""))),
                    signature: Vec::new(),
                }],
            ),
            "messages[1].parts[0].blob.uri",
        ),
        (
            message(
                Role::Tool,
                vec![Part {
                    kind: Some(Kind::ToolResult(proto::ToolResult {
                        tool_call_id: "c1".into(),
                        attachments: vec![blob("image/png", "", b"")],
                        ..Default::default()
                    })),
                    signature: Vec::new(),
                }],
            ),
            "messages[1].parts[0].tool_result.attachments[0]",
        ),
        (
            message(Role::User, vec![reasoning_as_text(&[1; 64 * 1024 + 1])]),
            "messages[1].parts[0].signature",
        ),
        (
            proto::NewMessage {
                name: "n".repeat(257),
                ..message(Role::User, vec![text("x")])
            },
            "messages[1].name",
        ),
        (
            proto::NewMessage {
                model: "m".repeat(257),
                ..message(Role::User, vec![text("x")])
            },
            "messages[1].model",
        ),
        (
            proto::NewMessage {
                usage: Some(usage(1, -1, 0, 0)),
                ..message(Role::Assistant, vec![text("x")])
            },
            "messages[1].usage.output_tokens",
        ),
    ];
    for (bad, field) in cases {
        expect_invalid(alice.append_messages(with(bad)).await, field);
    }
    // Limits are inclusive: 64 parts, 256 KiB inline, 64 KiB signatures,
    // 2,048-character URIs, 256-character names are all accepted.
    let at_limits = proto::NewMessage {
        name: "n".repeat(256),
        model: "m".repeat(256),
        usage: Some(usage(0, 0, 0, 0)),
        ..message(
            Role::User,
            std::iter::once(Part {
                kind: Some(Kind::Blob(blob("image/png", "", &vec![7; 256 * 1024]))),
                signature: vec![1; 64 * 1024],
            })
            .chain(std::iter::once(Part {
                kind: Some(Kind::Blob(blob("text/plain", &"u".repeat(2048), b""))),
                signature: Vec::new(),
            }))
            .chain(std::iter::repeat_n(text("x"), 62))
            .collect(),
        )
    };
    append_batch(&mut alice, &created.id, vec![at_limits])
        .await
        .expect("the limits themselves are allowed");
    // Nothing of the refused requests was written.
    assert_eq!(conversation(&mut alice, &created.id).await.message_count, 1);
}

/// A text part carrying a signature (signatures are allowed on any part).
fn reasoning_as_text(signature: &[u8]) -> Part {
    Part {
        signature: signature.to_vec(),
        ..text("t")
    }
}

#[tokio::test]
async fn a_tool_result_must_answer_an_earlier_call() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "integrity").await;
    append(&mut alice, &created.id, "hello").await;

    // An orphan result: FAILED_PRECONDITION naming the id, nothing written.
    let status = expect_code(
        alice
            .append_messages(AppendMessagesRequest {
                conversation_id: created.id.clone(),
                messages: vec![
                    message(Role::Assistant, vec![text("thinking")]),
                    message(Role::Tool, vec![result("call_missing", "x")]),
                ],
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    let failure = status
        .get_details_precondition_failure()
        .expect("a google.rpc.PreconditionFailure");
    assert_eq!(failure.violations[0].subject, "call_missing");
    assert!(status.message().contains("call_missing"), "{status:?}");
    assert_eq!(conversation(&mut alice, &created.id).await.message_count, 1);

    // A result before its call in the same batch is an orphan too.
    expect_code(
        alice
            .append_messages(AppendMessagesRequest {
                conversation_id: created.id.clone(),
                messages: vec![
                    message(Role::Tool, vec![result("call_late", "x")]),
                    message(Role::Assistant, vec![call("call_late", "f", "{}")]),
                ],
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );

    // The call and its result in one batch.
    let stored = append_batch(
        &mut alice,
        &created.id,
        vec![
            message(Role::Assistant, vec![call("call_1", "f", "{}")]),
            message(Role::Tool, vec![result("call_1", "done")]),
        ],
    )
    .await
    .expect("a call and its result in one batch");
    assert_eq!(stored[1].sequence, 3);

    // A result in a later call answers a call stored earlier.
    client_append_one(
        &mut alice,
        &created.id,
        message(Role::Tool, vec![result("call_1", "again")]),
    )
    .await;

    // A call id is unique per conversation: reused later → FAILED_PRECONDITION.
    let status = expect_code(
        alice
            .append_messages(AppendMessagesRequest {
                conversation_id: created.id.clone(),
                messages: vec![message(Role::Assistant, vec![call("call_1", "f", "{}")])],
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    let failure = status.get_details_precondition_failure().unwrap();
    assert_eq!(failure.violations[0].subject, "call_1");
    // …and twice in one batch → INVALID_ARGUMENT, naming the second.
    expect_invalid(
        alice
            .append_messages(AppendMessagesRequest {
                conversation_id: created.id.clone(),
                messages: vec![
                    message(Role::Assistant, vec![call("call_2", "f", "{}")]),
                    message(Role::Assistant, vec![call("call_2", "f", "{}")]),
                ],
                ..Default::default()
            })
            .await,
        "messages[1].parts[0].tool_call.id",
    );
    assert_eq!(conversation(&mut alice, &created.id).await.message_count, 4);

    // Another conversation's calls do not count.
    let other = create(&mut alice, "other").await;
    expect_code(
        alice
            .append_messages(AppendMessagesRequest {
                conversation_id: other.id.clone(),
                messages: vec![message(Role::Tool, vec![result("call_1", "x")])],
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
    // …but the same id may be used there.
    append_batch(
        &mut alice,
        &other.id,
        vec![message(Role::Assistant, vec![call("call_1", "f", "{}")])],
    )
    .await
    .expect("ids are unique per conversation, not globally");
}

#[tokio::test]
async fn resume_never_starts_with_a_result_whose_call_it_left_out() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "exchanges").await;
    // 1 user, 2 assistant calls a+b, 3 result a, 4 result b, 5 assistant,
    // 6 user, 7 assistant calls c, 8 assistant calls d (parallel, another
    // message), 9 result d, 10 result c, 11 assistant, 12 user.
    let plan = vec![
        proto::NewMessage {
            role: Role::User as i32,
            content: "go".into(),
            ..Default::default()
        },
        message(
            Role::Assistant,
            vec![call("a", "f", "{}"), call("b", "f", "{}")],
        ),
        message(Role::Tool, vec![result("a", "A")]),
        message(Role::Tool, vec![result("b", "B")]),
        message(Role::Assistant, vec![text("both done")]),
        message(Role::User, vec![text("more")]),
        message(Role::Assistant, vec![call("c", "f", "{}")]),
        message(Role::Assistant, vec![call("d", "f", "{}")]),
        message(Role::Tool, vec![result("d", "D")]),
        message(Role::Tool, vec![result("c", "C")]),
        message(Role::Assistant, vec![text("all done")]),
        message(Role::User, vec![text("thanks")]),
    ];
    append_batch(&mut alice, &created.id, plan)
        .await
        .expect("append the plan");
    // For each window size, where the widened window must begin.
    let expected_start = |max: i64| -> i64 {
        let start = 12 - max + 1;
        match start {
            3 | 4 => 2,
            9 => 7,  // result d (call in 8) and result c (call in 7): the earliest
            10 => 7, // result c answers the call in 7
            s => s.max(1),
        }
    };
    for max in 1..=13 {
        let resumed = resume(&mut alice, &created.id, max as i32).await;
        let first = resumed.messages.first().map_or(0, |m| m.sequence);
        assert_eq!(first, expected_start(max), "max_messages {max}");
        let sequences: Vec<i64> = resumed.messages.iter().map(|m| m.sequence).collect();
        assert_eq!(
            sequences,
            (first..=12).collect::<Vec<_>>(),
            "a contiguous window up to the end"
        );
        assert_eq!(resumed.has_more, first > 1, "max_messages {max}");
        assert_ne!(
            resumed.messages[0].role,
            Role::Tool as i32,
            "max_messages {max}: the window never starts with a result"
        );
    }
}

/// The widening and the response limit together: when the calls a window
/// would be widened to do not fit, the results are left out with them.
#[tokio::test]
async fn an_exchange_larger_than_the_response_limit_is_left_out_whole() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "big results").await;
    // 1 user, 2 assistant calls a–e, 3–7 a result of 900 KB each (4.5 MB
    // in all, over the 4 MiB limit), 8 assistant.
    let ids = ["a", "b", "c", "d", "e"];
    let mut plan = vec![
        proto::NewMessage {
            role: Role::User as i32,
            content: "read five pages".into(),
            ..Default::default()
        },
        message(
            Role::Assistant,
            ids.iter().map(|id| call(id, "fetch", "{}")).collect(),
        ),
    ];
    append_batch(&mut alice, &created.id, std::mem::take(&mut plan))
        .await
        .expect("append the calls");
    let page = "p".repeat(900_000);
    for id in ids {
        client_append_one(
            &mut alice,
            &created.id,
            message(Role::Tool, vec![result(id, &page)]),
        )
        .await;
    }
    client_append_one(
        &mut alice,
        &created.id,
        message(Role::Assistant, vec![text("read them all")]),
    )
    .await;
    // max 5 starts at result b (4), widened to the calls (2): 4.5 MB of
    // results do not fit, so neither calls nor results are returned.
    // max 4 starts at result c (5): widened too, the same answer.
    for max in [4, 5, 8] {
        let resumed = resume(&mut alice, &created.id, max).await;
        let sequences: Vec<i64> = resumed.messages.iter().map(|m| m.sequence).collect();
        assert_eq!(sequences, vec![8], "max_messages {max}");
        assert!(resumed.has_more, "max_messages {max}");
    }
    // max 1 is the answer alone, with nothing to widen.
    let resumed = resume(&mut alice, &created.id, 1).await;
    assert_eq!(resumed.messages.len(), 1);
    assert_eq!(resumed.messages[0].sequence, 8);
}

#[tokio::test]
async fn usage_is_summed_by_append_fork_and_truncate() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "costs").await;
    assert_eq!(created.usage, Some(usage(0, 0, 0, 0)));
    for (i, u) in [
        usage(100, 10, 50, 1),
        usage(200, 20, 0, 2),
        usage(300, 30, 100, 3),
    ]
    .into_iter()
    .enumerate()
    {
        client_append_one(
            &mut alice,
            &created.id,
            proto::NewMessage {
                usage: Some(u),
                ..message(Role::Assistant, vec![text(&format!("answer {i}"))])
            },
        )
        .await;
        // A message without usage adds nothing.
        append(&mut alice, &created.id, "next question").await;
    }
    assert_eq!(
        conversation(&mut alice, &created.id).await.usage,
        Some(usage(600, 60, 150, 6))
    );
    let fork = alice
        .fork_conversation(proto::ForkConversationRequest {
            conversation_id: created.id.clone(),
            up_to_sequence: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fork.usage, Some(usage(300, 30, 50, 3)));
    assert_eq!(
        conversation(&mut alice, &fork.id).await.usage,
        fork.usage,
        "the fork's sum is stored, not just returned"
    );
    let whole = alice
        .fork_conversation(proto::ForkConversationRequest {
            conversation_id: created.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(whole.usage, Some(usage(600, 60, 150, 6)));
    let truncated = alice
        .truncate_conversation(proto::TruncateConversationRequest {
            conversation_id: created.id.clone(),
            after_sequence: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(truncated.messages_deleted, 4);
    let after = truncated.conversation.unwrap();
    assert_eq!(after.usage, Some(usage(100, 10, 50, 1)));
    assert_eq!(after, conversation(&mut alice, &created.id).await);
}

#[tokio::test]
async fn fork_copies_parts_and_keeps_the_exchange_answerable() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "source").await;
    let sent = vec![
        proto::NewMessage {
            model: "m1".into(),
            name: "planner".into(),
            usage: Some(usage(5, 6, 0, 1)),
            ..message(
                Role::Assistant,
                vec![
                    reasoning("r", &[9, 0, 9]),
                    call("k1", "search", "{\"q\":1}"),
                ],
            )
        },
        message(Role::Tool, vec![result("k1", "found")]),
        message(Role::Assistant, vec![call("k2", "search", "{}")]),
    ];
    let original = append_batch(&mut alice, &created.id, sent.clone())
        .await
        .unwrap();
    let fork = alice
        .fork_conversation(proto::ForkConversationRequest {
            conversation_id: created.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let copied = all_messages(&mut alice, &fork.id).await;
    for ((copy, source), sent) in copied.iter().zip(&original).zip(&sent) {
        assert_same_payload(copy, sent);
        assert_eq!(copy.content, source.content);
        assert_ne!(copy.id, source.id);
    }
    // The open call k2 can be answered in the fork, and k1 cannot be reused.
    client_append_one(
        &mut alice,
        &fork.id,
        message(Role::Tool, vec![result("k2", "late")]),
    )
    .await;
    expect_code(
        alice
            .append_messages(AppendMessagesRequest {
                conversation_id: fork.id.clone(),
                messages: vec![message(Role::Assistant, vec![call("k1", "f", "{}")])],
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
    );
}

#[tokio::test]
async fn replays_compare_parts_too() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "replay").await;
    let request = |arguments: &str| AppendMessageRequest {
        conversation_id: created.id.clone(),
        role: Role::Assistant as i32,
        parts: vec![call("r1", "f", arguments)],
        request_id: "turn-7".into(),
        usage: Some(usage(1, 2, 0, 0)),
        ..Default::default()
    };
    let first = alice
        .append_message(request("{\"a\":1}"))
        .await
        .unwrap()
        .into_inner();
    let again = alice
        .append_message(request("{\"a\":1}"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first, "the retry returns the original message");
    expect_code(
        alice.append_message(request("{\"a\":2}")).await,
        Code::FailedPrecondition,
    );
    let changed_usage = AppendMessageRequest {
        usage: Some(usage(1, 3, 0, 0)),
        ..request("{\"a\":1}")
    };
    expect_code(
        alice.append_message(changed_usage).await,
        Code::FailedPrecondition,
    );
    assert_eq!(conversation(&mut alice, &created.id).await.message_count, 1);
    assert_eq!(
        conversation(&mut alice, &created.id).await.usage,
        Some(usage(1, 2, 0, 0)),
        "a replay adds no usage"
    );
}

#[tokio::test]
async fn truncate_rewinds_the_conversation() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "rewind").await;
    for i in 1..=3 {
        append(&mut alice, &created.id, &format!("m{i}")).await;
    }
    let keyed = AppendMessageRequest {
        conversation_id: created.id.clone(),
        role: Role::Assistant as i32,
        parts: vec![call("t1", "f", "{}")],
        request_id: "answer-4".into(),
        ..Default::default()
    };
    let fourth = alice
        .append_message(keyed.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fourth.sequence, 4);

    let truncate = |after: i64, expected: Option<i64>| proto::TruncateConversationRequest {
        conversation_id: created.id.clone(),
        after_sequence: after,
        expected_last_sequence: expected,
    };
    // Beyond the end, negative: INVALID_ARGUMENT; a stale expectation: ABORTED.
    expect_invalid(
        alice.truncate_conversation(truncate(5, None)).await,
        "after_sequence",
    );
    expect_invalid(
        alice.truncate_conversation(truncate(-1, None)).await,
        "after_sequence",
    );
    expect_code(
        alice.truncate_conversation(truncate(2, Some(3))).await,
        Code::Aborted,
    );
    assert_eq!(conversation(&mut alice, &created.id).await.message_count, 4);

    let before = conversation(&mut alice, &created.id).await;
    let cut = alice
        .truncate_conversation(truncate(2, Some(4)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cut.messages_deleted, 2);
    let after = cut.conversation.unwrap();
    assert_eq!(after.message_count, 2);
    assert!(
        crate::helpers::micros(&after.update_time) >= crate::helpers::micros(&before.update_time)
    );
    let left: Vec<String> = all_messages(&mut alice, &created.id)
        .await
        .into_iter()
        .map(|m| m.content)
        .collect();
    assert_eq!(left, ["m1", "m2"]);

    // The next append gets after_sequence + 1; the removed message's
    // request_id is forgotten, so its retry appends anew; the removed tool
    // call's id is free again.
    let retried = alice.append_message(keyed).await.unwrap().into_inner();
    assert_eq!(retried.sequence, 3);
    assert_ne!(retried.id, fourth.id);
    // Truncating at the end removes nothing; to 0 empties it.
    let noop = alice
        .truncate_conversation(truncate(3, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(noop.messages_deleted, 0);
    let emptied = alice
        .truncate_conversation(truncate(0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(emptied.messages_deleted, 3);
    assert_eq!(emptied.conversation.unwrap().message_count, 0);
    assert_eq!(append(&mut alice, &created.id, "fresh").await.sequence, 1);
    // Someone else's conversation: NOT_FOUND.
    expect_code(
        app.client("mallory")
            .truncate_conversation(truncate(0, None))
            .await,
        Code::NotFound,
    );
}

#[tokio::test]
async fn truncation_ends_watch_streams_past_the_cut_with_aborted() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "watched").await;
    for i in 1..=4 {
        append(&mut alice, &created.id, &format!("m{i}")).await;
    }
    // Streams that were sent messages above the cut: from the start, from
    // after 3, from after 2 (the cut itself) and from after 1.
    let mut delivered = watch(&mut alice, &created.id, 0).await;
    for expected in 1..=4 {
        let m = tokio::time::timeout(Duration::from_secs(10), delivered.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.sequence, expected);
    }
    let mut asked_after = watch(&mut alice, &created.id, 3).await;
    let m = tokio::time::timeout(Duration::from_secs(10), asked_after.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.sequence, 4);
    let mut at_cut = watch(&mut alice, &created.id, 2).await;
    for expected in 3..=4 {
        let m = tokio::time::timeout(Duration::from_secs(10), at_cut.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.sequence, expected);
    }
    let mut before_cut = watch(&mut alice, &created.id, 1).await;
    for expected in 2..=4 {
        let m = tokio::time::timeout(Duration::from_secs(10), before_cut.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.sequence, expected);
    }

    alice
        .truncate_conversation(proto::TruncateConversationRequest {
            conversation_id: created.id.clone(),
            after_sequence: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    // Re-appended past the old position: the streams past the cut must not
    // go on as if nothing happened.
    let new_third = append(&mut alice, &created.id, "m3 again").await;
    append(&mut alice, &created.id, "m4 again").await;
    append(&mut alice, &created.id, "m5").await;

    for (name, stream) in [
        ("delivered", &mut delivered),
        ("asked after", &mut asked_after),
    ] {
        let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| panic!("{name}: the stream did not end"));
        let status = end.expect_err(name);
        assert_eq!(status.code(), Code::Aborted, "{name}: {status:?}");
    }
    // A stream that asked from the cut or before it, but was sent 3 and 4
    // of the old history, is past the cut too.
    let end = tokio::time::timeout(Duration::from_secs(10), at_cut.message())
        .await
        .unwrap();
    assert_eq!(end.expect_err("at_cut delivered 4").code(), Code::Aborted);
    let next = tokio::time::timeout(Duration::from_secs(10), before_cut.message())
        .await
        .unwrap();
    assert_eq!(
        next.expect_err("before_cut delivered 4").code(),
        Code::Aborted
    );
    // A new stream from the cut sees the new history.
    let mut fresh = watch(&mut alice, &created.id, 2).await;
    let m = tokio::time::timeout(Duration::from_secs(10), fresh.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.id, new_third.id);
}

#[tokio::test]
async fn a_stream_positioned_at_the_cut_continues() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "kept").await;
    for i in 1..=4 {
        append(&mut alice, &created.id, &format!("m{i}")).await;
    }
    let mut stream = watch(&mut alice, &created.id, 1).await;
    let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.sequence, 2);
    // Drain 3 and 4 later: first cut back to 4 (nothing removed), then
    // append; the stream stays whole.
    alice
        .truncate_conversation(proto::TruncateConversationRequest {
            conversation_id: created.id.clone(),
            after_sequence: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    append(&mut alice, &created.id, "m5").await;
    for expected in 3..=5 {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.sequence, expected);
    }
}

#[tokio::test]
async fn search_finds_text_parts_and_tool_results_not_arguments() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "searchable").await;
    append_batch(
        &mut alice,
        &created.id,
        vec![
            message(
                Role::Assistant,
                vec![
                    text("checking zanzibar"),
                    call("s1", "lookup", r#"{"secretword": "quokka"}"#),
                ],
            ),
            message(
                Role::Tool,
                vec![result("s1", "the ferry to zanzibar leaves at noon")],
            ),
        ],
    )
    .await
    .unwrap();
    let search = |query: &str| proto::SearchMessagesRequest {
        query: query.into(),
        ..Default::default()
    };
    let hits = alice
        .search_messages(search("zanzibar"))
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 2);
    let ferry = hits
        .iter()
        .find(|h| h.message.as_ref().unwrap().sequence == 2)
        .expect("the tool result is found");
    assert!(ferry.snippet.contains("<mark>zanzibar</mark>"));
    assert_eq!(ferry.message.as_ref().unwrap().parts.len(), 1);
    let none = alice
        .search_messages(search("quokka"))
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert!(none.is_empty(), "tool arguments are not indexed");
}

#[tokio::test]
async fn the_schema_backs_the_rules_on_its_own() {
    use diesel_async::SimpleAsyncConnection;
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let created = create(&mut alice, "backed").await;
    append_batch(
        &mut alice,
        &created.id,
        vec![message(Role::Assistant, vec![call("z1", "f", "{}")])],
    )
    .await
    .unwrap();
    let mut db = app.db.connect().await;
    let id = &created.id;
    let insert = |sequence: i64, columns: &str, values: &str| {
        format!(
            "INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, create_time, \
                                   bytes_through{columns}) \
             VALUES ('alice', '{id}', {sequence}, gen_random_uuid(), 1, 'x', now(), 1000{values})"
        )
    };
    for refused in [
        // A tool call id twice in one conversation.
        format!(
            "INSERT INTO tool_calls (user_id, conversation_id, tool_call_id, sequence) \
             VALUES ('alice', '{id}', 'z1', 1)"
        ),
        // Ids of visible ASCII only, at most 256 bytes.
        format!(
            "INSERT INTO tool_calls (user_id, conversation_id, tool_call_id, sequence) \
             VALUES ('alice', '{id}', 'a b', 1)"
        ),
        format!(
            "INSERT INTO tool_calls (user_id, conversation_id, tool_call_id, sequence) \
             VALUES ('alice', '{id}', repeat('x', 257), 1)"
        ),
        // A call must belong to a stored message.
        format!(
            "INSERT INTO tool_calls (user_id, conversation_id, tool_call_id, sequence) \
             VALUES ('alice', '{id}', 'z9', 99)"
        ),
        insert(2, "", "").replace(", 1, 'x'", ", 6, 'x'"),
        insert(2, "", "").replace("'x'", "''"),
        insert(
            2,
            ", input_tokens, output_tokens, cached_input_tokens, reasoning_tokens",
            ", -1, 0, 0, 0",
        ),
        insert(2, ", input_tokens", ", 5"),
        insert(2, ", name", ", repeat('n', 257)"),
        insert(2, ", answers_from", ", 2"),
        // A running byte total smaller than the message itself.
        insert(2, "", "").replace("now(), 1000", "now(), 0"),
        format!("UPDATE conversations SET usage_input_tokens = -1 WHERE id = '{id}'"),
        format!("UPDATE conversations SET total_bytes = -1 WHERE id = '{id}'"),
    ] {
        assert!(
            db.batch_execute(&refused).await.is_err(),
            "the database accepted: {refused}"
        );
    }
    // An empty content is fine when parts hold the message.
    db.batch_execute(&insert(2, ", parts", ", '\\x0a00'").replace("'x'", "''"))
        .await
        .expect("parts without text");
}

/// Resume bounds its window by the running byte total each message stores
/// (`bytes_through`) and the conversation's `total_bytes`. Every way
/// messages come and go keeps both equal to the sizes summed afresh: plain
/// and structured messages, one at a time and in batches, with a request_id
/// and tool exchanges, a truncation and forks.
#[tokio::test]
async fn the_running_byte_totals_match_the_messages() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let chat = create(&mut alice, "sizes").await;
    append(&mut alice, &chat.id, "plain text, ünïcödé").await;
    append_batch(
        &mut alice,
        &chat.id,
        vec![
            message(
                Role::User,
                vec![
                    text("look at this"),
                    Part {
                        kind: Some(Kind::Blob(blob("image/png", "", &[7; 3000]))),
                        signature: Vec::new(),
                    },
                ],
            ),
            message(Role::Assistant, vec![call("c1", "search", "{\"q\":\"x\"}")]),
            message(Role::Tool, vec![result("c1", "found it")]),
        ],
    )
    .await
    .expect("a batch with parts and a tool exchange");
    alice
        .append_message(AppendMessageRequest {
            conversation_id: chat.id.clone(),
            role: Role::Assistant as i32,
            parts: vec![reasoning("hmm", b"sig")],
            request_id: "turn-1".into(),
            ..Default::default()
        })
        .await
        .expect("one structured message with a request_id");
    append(&mut alice, &chat.id, "the answer").await;
    alice
        .truncate_conversation(proto::TruncateConversationRequest {
            conversation_id: chat.id.clone(),
            after_sequence: 4,
            ..Default::default()
        })
        .await
        .expect("truncate");
    append(&mut alice, &chat.id, "another answer").await;
    for up_to_sequence in [0, 2] {
        let fork = alice
            .fork_conversation(proto::ForkConversationRequest {
                conversation_id: chat.id.clone(),
                up_to_sequence,
                ..Default::default()
            })
            .await
            .expect("fork")
            .into_inner();
        append(&mut alice, &fork.id, "on the fork").await;
    }

    assert_eq!(
        app.db.count("SELECT count(*) AS n FROM messages").await,
        5 + 6 + 3
    );
    let wrong_messages = app
        .db
        .count(
            "SELECT count(*) AS n FROM ( \
                 SELECT bytes_through, \
                        sum(octet_length(content) + coalesce(octet_length(parts), 0)) \
                            OVER (PARTITION BY user_id, conversation_id ORDER BY sequence) AS summed \
                   FROM messages) AS m \
              WHERE bytes_through <> summed",
        )
        .await;
    assert_eq!(wrong_messages, 0, "every message's running total");
    let wrong_conversations = app
        .db
        .count(
            "SELECT count(*) AS n FROM conversations c \
              WHERE total_bytes <> coalesce( \
                  (SELECT sum(octet_length(content) + coalesce(octet_length(parts), 0)) \
                     FROM messages m WHERE m.user_id = c.user_id AND m.conversation_id = c.id), 0)",
        )
        .await;
    assert_eq!(wrong_conversations, 0, "every conversation's total");
    assert_eq!(
        app.db
            .count("SELECT count(*) AS n FROM conversations")
            .await,
        3
    );
}

/// During a rolling upgrade, replicas of the release before the running byte
/// totals write messages without one and leave the conversation's total
/// alone. Resume still returns those messages, in order.
#[tokio::test]
async fn a_message_written_without_a_running_total_is_resumed() {
    let app = TestApp::spawn().await;
    let mut alice = app.client("alice");
    let chat = create(&mut alice, "upgrade").await;
    append(&mut alice, &chat.id, "from the new release").await;
    // What the previous release's append wrote.
    app.db
        .run_sql(&format!(
            "INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, create_time) \
             VALUES ('alice', '{id}', 2, gen_random_uuid(), 2, 'from the old release', now()); \
             UPDATE conversations SET message_count = 2 WHERE user_id = 'alice' AND id = '{id}'",
            id = chat.id
        ))
        .await;
    append(&mut alice, &chat.id, "new again").await;
    let resumed = resume(&mut alice, &chat.id, 10).await;
    let contents: Vec<&str> = resumed
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(
        contents,
        ["from the new release", "from the old release", "new again"]
    );
    assert!(!resumed.has_more);
}
