// Chat with elmd from Node using the official `openai` npm package, streaming the answer.
//
//   cd clients/node && npm install && node chat.mjs "Why is the sky blue?"
//
// ELMD_URL (default http://127.0.0.1:8356), ELMD_API_KEY (if the daemon needs one) and
// ELMD_MODEL (default: the first model the daemon lists) configure it.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: `${process.env.ELMD_URL ?? "http://127.0.0.1:8356"}/v1`,
  apiKey: process.env.ELMD_API_KEY ?? "elmd", // the SDK wants a key; without auth any value works
});

const model = process.env.ELMD_MODEL ?? (await client.models.list()).data[0].id;
const question = process.argv.slice(2).join(" ") || "Say hello in one sentence.";

const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: question }],
  max_tokens: Number(process.env.ELMD_MAX_TOKENS ?? 256),
  stream: true,
});
for await (const chunk of stream) {
  process.stdout.write(chunk.choices[0]?.delta?.content ?? "");
}
process.stdout.write("\n");
