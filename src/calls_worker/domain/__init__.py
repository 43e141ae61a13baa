"""The calls domain: pure rules, no SQL, no queue."""
