//! Chat messages and the overflow policy.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// Removes the oldest exchange (everything up to, not including, the next
/// user message after the first one), keeping any leading system message.
/// Returns how many messages were removed; 0 when only the last user turn is
/// left and nothing more can go.
pub fn drop_oldest_turn(messages: &mut Vec<ChatMessage>) -> usize {
    let start = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
    let Some(last_user) = messages.iter().rposition(|m| m.role == Role::User) else {
        return 0;
    };
    if last_user <= start {
        return 0;
    }
    // The oldest turn runs from `start` to the next user message after it.
    let end = messages[start + 1..=last_user]
        .iter()
        .position(|m| m.role == Role::User)
        .map_or(last_user, |i| start + 1 + i);
    messages.drain(start..end);
    end - start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_whole_turns_and_keeps_system_and_last_question() {
        let mut msgs = vec![
            ChatMessage::system("s"),
            ChatMessage::user("u1"),
            ChatMessage::assistant("a1"),
            ChatMessage::user("u2"),
            ChatMessage::assistant("a2"),
            ChatMessage::user("u3"),
        ];
        assert_eq!(drop_oldest_turn(&mut msgs), 2);
        assert_eq!(msgs[1].content, "u2");
        assert_eq!(drop_oldest_turn(&mut msgs), 2);
        assert_eq!(
            msgs,
            vec![ChatMessage::system("s"), ChatMessage::user("u3")]
        );
        assert_eq!(drop_oldest_turn(&mut msgs), 0);
    }
}
