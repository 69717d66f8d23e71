"""External serving engines (vLLM) that our drafters are exported to and our numbers are checked against."""
