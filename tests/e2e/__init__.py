"""End-to-end tests: real `twistd -n stui` processes, clients over sockets."""
