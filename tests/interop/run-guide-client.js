// Drives the guide's own NexusWSClient against a server: connect, subscribe,
// send one telemetry sample, then print each event as a line "EVENT <json>".
// Usage: node run-guide-client.js URL TOKEN DEVICE_ID
const NexusWSClient = require('./guide-client.js');

const [url, token, deviceId] = process.argv.slice(2);
const client = new NexusWSClient(url, token, { reconnect: false });
const out = (obj) => console.log('EVENT ' + JSON.stringify(obj));
const timer = setTimeout(() => { out({ event: 'timeout' }); process.exit(3); }, 15000);

client.on('connected', () => {
  out({ event: 'connected' });
  client.subscribe('telemetry', { device_id: deviceId });
  client.subscribe('commands');
  client.sendTelemetry({ device_id: deviceId, metrics: { cpu_usage: 12.5, memory_usage: 40.1 } });
});
client.on('ack', (ack) => out({ event: 'ack', id: ack.id }));
client.on('server_error', (error) => out({ event: 'server_error', error }));
client.on('telemetry.update', (payload) => {
  out({ event: 'telemetry.update', payload });
  clearTimeout(timer);
  client.disconnect();
});
client.connect();
