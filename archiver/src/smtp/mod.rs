//! SMTP and LMTP listeners.
