// Drives the guide's own NexusWSClient as an operator: connect, subscribe to all
// telemetry, and exit 0 once a telemetry.update arrived from every device named.
// Each event is printed as a line "EVENT <json>".
// Usage: node run-guide-operator.js URL TOKEN DEVICE_ID...
const NexusWSClient = require('./guide-client.js');

const [url, token, ...devices] = process.argv.slice(2);
const waiting = new Set(devices);
const client = new NexusWSClient(url, token, { reconnect: false });
const out = (obj) => console.log('EVENT ' + JSON.stringify(obj));
const timer = setTimeout(() => { out({ event: 'timeout', waiting: [...waiting] }); process.exit(3); }, 15000);

client.on('connected', () => {
  out({ event: 'connected' });
  client.subscribe('telemetry');
});
client.on('server_error', (error) => out({ event: 'server_error', error }));
client.on('telemetry.update', (payload) => {
  out({ event: 'telemetry.update', payload });
  waiting.delete(payload.device_id);
  if (waiting.size === 0) {
    clearTimeout(timer);
    client.disconnect();
    process.exit(0);
  }
});
client.connect();
