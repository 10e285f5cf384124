"""`edentune review WS`: the human steps of the cycle in a local web app (data review, blind
comparison, dashboard). A UI over edentune.cycle: it imports the cycle and below, never the reverse."""
