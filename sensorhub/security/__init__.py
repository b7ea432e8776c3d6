"""Credentials and certificates: the private CA of a stack, the broker's password and ACL files,
Redis ACL users, the chdb-server's users, and how every process reads its secrets from files.

Nothing here puts a secret in a command line or a log line: secrets live in files of mode 0600
(or systemd credentials), and their paths are what processes are given.
"""
