// Runs the guide's reference server (guide-server.js, verbatim) with the two
// functions the guide leaves undefined filled in: every telemetry payload it
// receives is printed as a line "TELEMETRY <json>".
// Usage: JWT_SECRET=... WS_PORT=... node run-guide-server.js
global.handleTelemetry = (clientId, payload) => {
  console.log('TELEMETRY ' + JSON.stringify(payload));
};
global.handleCommand = async (clientId, payload) => ({ accepted: true, payload });
require('./guide-server.js');
