"""INT8: the planner, the QDQ rewrite and the forms derived from it."""
