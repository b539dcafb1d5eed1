"""Who may do what: passwords, authentication, tokens."""
