"""Dense -> MoE: the upcycling math (pure functions), `upcycle convert`, `compose`, `grow`, router calibration and
`upcycle check`."""
