"""Who may act: operator tokens, device enrollment and credentials, the broker's ACL."""
