"""OpenAI's Responses API, with the store that keeps responses for previous_response_id."""
