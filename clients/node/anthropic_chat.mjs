// Chat with elmd from Node using the official `@anthropic-ai/sdk` npm package (Anthropic's
// Messages API), streaming the answer: what an app built on Anthropic's SDK does.
//
//   cd clients/node && npm install && node anthropic_chat.mjs "Why is the sky blue?"
//
// ELMD_URL (default http://127.0.0.1:8356), ELMD_API_KEY (if the daemon needs one; sent as
// x-api-key) and ELMD_MODEL (default: the first model the daemon lists) configure it.
import Anthropic from "@anthropic-ai/sdk";

const client = new Anthropic({
  baseURL: process.env.ELMD_URL ?? "http://127.0.0.1:8356",
  apiKey: process.env.ELMD_API_KEY ?? "elmd", // the SDK wants a key; without auth any value works
});

const model = process.env.ELMD_MODEL ?? (await client.models.list()).data[0].id;
const question = process.argv.slice(2).join(" ") || "Say hello in one sentence.";

const stream = client.messages.stream({
  model,
  max_tokens: Number(process.env.ELMD_MAX_TOKENS ?? 256),
  messages: [{ role: "user", content: question }],
});
stream.on("text", (text) => process.stdout.write(text));
const message = await stream.finalMessage();
process.stdout.write(`\n[${message.stop_reason}, ${message.usage.output_tokens} tokens]\n`);
