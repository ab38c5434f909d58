"""What the tests share: waiting on conditions and runs, real servers on loopback, test data and sources."""
