"""The client SDK: submit a job, verify its instance's evidence yourself, then release your secrets to it."""
